"""Sequential models that read item text: LLM-ESR (:mod:`.llmesr`) and FAERec (:mod:`.faerec`),
each on three backbones — SASRec (``llmesr``, ``faerec``), GRU4Rec (``llmesr-gru4rec``,
``faerec-gru4rec``) and BERT4Rec (``llmesr-bert4rec``, ``faerec-bert4rec``).

They build on the backbones of :mod:`recforge.models.sequential` by composition: the backbone's
network is built by its own ``build`` and run unchanged, with its item embedding module swapped
for a lookup into the item representations the model computes from ID embeddings and frozen text
vectors (:mod:`.base`).

Item vectors: a model declares ``needs_items = True``; a runner that has the dataset calls
``model.attach_dataset(ds)`` before ``fit`` and the model builds its vectors through the cache
(:mod:`recforge.semantic.store`). ``semantic_table=FILE`` names a table written by ``recforge
embed`` on the same data instead (with ``--marc``: compressed language-model vectors,
:mod:`recforge.semantic.marc`); when given, it is used whether or not a dataset is attached.
"""
