"""Data: batch sources with an exact resume position, over in-memory text or WebDataset shards.

    from sgfm_dist.data import build_text_source, PAD_ID, BYTE_VOCAB_SIZE
    src = build_text_source("builtin", "train", batch_size=8, rows=16, row_len=64,
                            seed=0, dp_rank=dp_rank, dp_size=dp_size)
    it = iter(src); batch = next(it)          # tokens/pad_mask [B, T, L], doc_ids, sample_ids
    client_state["data"] = src.state_dict()   # plain ints/strs/lists
    src.load_state_dict(client_state["data"]) # the next iter() continues exactly there

Modules: ``stream`` (order, dp/worker split, shuffling, exact resume, DataLoader workers),
``text`` (byte encoding, [T, L] windows, ``build_text_source``), ``fields`` (video clips and
Navier-Stokes trajectories as [C, T, *S] fields, ``build_video_source`` /
``build_physics_source``), ``timeseries`` (windows [T, F] as 1-D fields, the built-in Sines
benchmark, ``build_timeseries_source``), ``corpus`` (documents, the built-in corpus, hash split), ``urls``
(fsspec shard lists and manifests, tar reading, corrupt-shard policy), ``shards`` (atomic
shard writing, P-independent conversion plans, manifests, MPI ranks), ``converters`` (the
text / video / physics / time-series converters behind ``tools/``), ``inspect`` (``tools/inspect_shards.py``).
"""
from .corpus import Document, builtin_corpus_documents, builtin_corpus_path, read_documents, split_of
from .fields import FrameStackCodec, build_physics_source, build_video_source, frames_to_field
from .stream import BatchSource, CorruptShardError, LoaderConfig, StreamingSource
from .text import BYTE_VOCAB_SIZE, PAD_ID, TextCodec, build_text_source, decode_bytes, encode_bytes
from .timeseries import Normalization, SeriesCodec, build_timeseries_source, load_series, sines
from .urls import register_fsspec_gopen, resolve_shards

__all__ = [
    "BatchSource", "StreamingSource", "LoaderConfig", "CorruptShardError",
    "BYTE_VOCAB_SIZE", "PAD_ID", "encode_bytes", "decode_bytes", "TextCodec", "build_text_source",
    "Document", "builtin_corpus_path", "builtin_corpus_documents", "read_documents", "split_of",
    "resolve_shards", "register_fsspec_gopen",
    "FrameStackCodec", "build_video_source", "build_physics_source", "frames_to_field",
    "Normalization", "SeriesCodec", "build_timeseries_source", "load_series", "sines",
]
