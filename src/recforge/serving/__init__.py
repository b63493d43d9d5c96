"""Serving: export a run as a checksummed artifact and serve it over HTTP.

* :func:`export_artifact` / :func:`load_artifact` (:mod:`recforge.serving.artifact`) need only the
  core dependencies;
* :func:`create_app` / :func:`run_server` (:mod:`recforge.serving.app`) need the ``serve`` extra
  (FastAPI, uvicorn, FAISS).
"""

from recforge.serving.artifact import Artifact, ArtifactError, export_artifact, load_artifact, verify_artifact


def create_app(*args, **kwargs):
    """The FastAPI app; see :func:`recforge.serving.app.create_app`."""
    from recforge.serving.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def run_server(*args, **kwargs):
    """Serve an artifact with uvicorn; see :func:`recforge.serving.app.run_server`."""
    from recforge.serving.app import run_server as _run_server

    return _run_server(*args, **kwargs)


__all__ = ["Artifact", "ArtifactError", "create_app", "export_artifact", "load_artifact", "run_server",
           "verify_artifact"]
