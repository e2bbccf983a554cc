"""Training data: raw records (JSON Lines, JSON, Parquet, Arrow, saved `datasets`) converted into stores (HDF5,
JSON Lines, memory-mapped), datasets per training type, and a resumable distributed sampler."""

from astrai.dataset.chat_encoder import ChatEncoder, RefusedRecord
from astrai.dataset.convert import Converted, convert_records, save_store
from astrai.dataset.corpus import Topic, builtin_texts, builtin_topics, corpus_records, write_corpus
from astrai.dataset.dataset import BaseDataset, DatasetFactory, collate
from astrai.dataset.grpo_dataset import GRPODataset
from astrai.dataset.h5_store import H5Store, save_h5
from astrai.dataset.json_store import JSONStore, save_jsonl
from astrai.dataset.mmap_store import MmapStore, save_mmap
from astrai.dataset.records import map_fields, read_records, read_texts
from astrai.dataset.sampler import ResumableDistributedSampler
from astrai.dataset.store import Store, StoreFactory
from astrai.dataset.window_datasets import DPODataset, SEQDataset, SFTDataset

__all__ = [
    "BaseDataset",
    "ChatEncoder",
    "Converted",
    "DPODataset",
    "DatasetFactory",
    "GRPODataset",
    "H5Store",
    "JSONStore",
    "MmapStore",
    "RefusedRecord",
    "ResumableDistributedSampler",
    "SEQDataset",
    "SFTDataset",
    "Store",
    "StoreFactory",
    "Topic",
    "builtin_texts",
    "builtin_topics",
    "collate",
    "convert_records",
    "corpus_records",
    "map_fields",
    "read_records",
    "read_texts",
    "save_h5",
    "save_jsonl",
    "save_mmap",
    "save_store",
    "write_corpus",
]
