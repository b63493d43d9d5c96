"""Models by name, with their YAML defaults (``recforge/configs/models/<name>.yaml``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from recforge.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

#: name -> "module:Class"; modules import on first use so that `recforge --help` stays fast
_MODELS: dict[str, str] = {
    "pop": "recforge.models.general.pop:Pop",
    "itemknn": "recforge.models.general.itemknn:ItemKNN",
    "ease": "recforge.models.general.ease:EASE",
    "bpr": "recforge.models.general.bpr:BPRMF",
    "sasrec": "recforge.models.sequential.sasrec:SASRec",
    "gru4rec": "recforge.models.sequential.gru4rec:GRU4Rec",
    "bert4rec": "recforge.models.sequential.bert4rec:BERT4Rec",
    "cl4srec": "recforge.models.sequential.cl4srec:CL4SRec",
    "duorec": "recforge.models.sequential.duorec:DuoRec",
    "grec": "recforge.models.sequential.grec:GRec",
    "cmnrec": "recforge.models.sequential.cmnrec:CmnRec",
    "magnn": "recforge.models.sequential.magnn:MAGNN",
    "apgl4sr": "recforge.models.sequential.apgl4sr:APGL4SR",
    "diffuasr": "recforge.models.sequential.diffuasr:DiffuASR",
    "lightgcn": "recforge.models.graph.lightgcn:LightGCN",
    "sgl": "recforge.models.graph.sgl:SGL",
    "simgcl": "recforge.models.graph.simgcl:SimGCL",
    "sgcl": "recforge.models.graph.sgcl:SGCL",
    "lsgrec": "recforge.models.graph.lsgrec:LSGRec",
    "mhcn": "recforge.models.graph.mhcn:MHCN",
    "imca": "recforge.models.graph.imca:IMCA",
    "til": "recforge.models.graph.til:TIL",
    "drgo": "recforge.models.graph.drgo:DRGO",
    "causaldiffrec": "recforge.models.graph.causaldiffrec:CausalDiffRec",
    "cnsdiff": "recforge.models.graph.cnsdiff:CNSDiff",
    "hetsgformer": "recforge.models.graph.hetsgformer:HetSGFormer",
    "llmesr": "recforge.models.semantic.llmesr:LLMESR",
    "llmesr-gru4rec": "recforge.models.semantic.llmesr:LLMESRGRU4Rec",
    "llmesr-bert4rec": "recforge.models.semantic.llmesr:LLMESRBERT4Rec",
    "faerec": "recforge.models.semantic.faerec:FAERec",
    "faerec-gru4rec": "recforge.models.semantic.faerec:FAERecGRU4Rec",
    "faerec-bert4rec": "recforge.models.semantic.faerec:FAERecBERT4Rec",
    # multi-behaviour models (data.target_behavior names the behaviour they rank for)
    "mbgcn": "recforge.models.multibehavior.mbgcn:MBGCN",
    "mbsasrec": "recforge.models.multibehavior.mbsasrec:MBSASRec",
    "cigf": "recforge.models.multibehavior.cigf:CIGF",
    "ckml": "recforge.models.multibehavior.ckml:CKML",
    "kamcl": "recforge.models.multibehavior.kamcl:KAMCL",
    "pdb4rec": "recforge.models.multibehavior.pdb4rec:PDB4Rec",
    "dpcpl": "recforge.models.multibehavior.dpcpl:DPCPL",
    # click-through-rate models (task "ctr": labelled feature rows)
    "lr": "recforge.models.ctr.lr:LR",
    "fm": "recforge.models.ctr.fm:FM",
    "deepfm": "recforge.models.ctr.deepfm:DeepFM",
    "dcnv2": "recforge.models.ctr.dcnv2:DCNv2",
    "din": "recforge.models.ctr.din:DIN",
    "finalmlp": "recforge.models.ctr.finalmlp:FinalMLP",
    "gem": "recforge.models.ctr.gem:GEM",
    # a CTR backbone aligned with a pre-trained language model (rows carry text: data.text)
    "flip": "recforge.models.ctr.flip:FLIP",
    "clickprompt": "recforge.models.ctr.clickprompt:ClickPrompt",
    # multi-task CTR models (one output per label)
    "sharedbottom": "recforge.models.ctr.sharedbottom:SharedBottom",
    "mmoe": "recforge.models.ctr.mmoe:MMoE",
    "ple": "recforge.models.ctr.ple:PLE",
    "esmm": "recforge.models.ctr.esmm:ESMM",
}


def register(name: str, target: str) -> None:
    """Register a model class given as ``"package.module:Class"``."""
    _MODELS[name.lower()] = target


def available() -> list[str]:
    return sorted(_MODELS)


def get_model_class(name: str):
    key = name.lower()
    if key not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available())}")
    module, cls = _MODELS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def defaults(name: str) -> dict:
    """The model's YAML defaults (empty when it has no file)."""
    get_model_class(name)
    path = CONFIG_DIR / f"{name.lower()}.yaml"
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def create(name: str, **overrides):
    """Instantiate a model from its defaults plus ``overrides``; unknown keys are an error."""
    cls = get_model_class(name)
    params = defaults(name) | overrides
    allowed = cls.param_names()
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)} for model {name!r}; valid: {', '.join(sorted(allowed))}"
        )
    return cls(**params)
