"""The one way to cache: every artifact kind, its key, its lock and its atomic publish.

`kinds` declares what is stored and under which key fields; `digest` makes keys; `atomic` makes a
file or directory visible only once complete and durable; `lock` serialises writers; `shards` runs
resumable passes; `entry` ties them together for one keyed artifact; `checked` reads any stored file back or says it
cannot (then it is quarantined and computed again).
"""

from mcollapse.store.atomic import atomic_path, publish, publish_dir, write_json, write_npz, write_text
from mcollapse.store.checked import Unreadable, read_json, read_json_object, read_npy, read_npz, read_torch
from mcollapse.store.digest import ContentDigests, canonical_json, ids_digest, key, texts_digest
from mcollapse.store.entry import Entry, entry, quarantine, read_or_quarantine
from mcollapse.store.kinds import KINDS, Kind, kind
from mcollapse.store.lock import lock
from mcollapse.store.shards import sharded_pass

__all__ = [
    "KINDS", "ContentDigests", "Entry", "Kind", "Unreadable", "atomic_path", "canonical_json", "entry", "ids_digest",
    "key", "kind", "lock", "publish", "publish_dir", "quarantine", "read_json", "read_json_object", "read_npy",
    "read_npz", "read_or_quarantine", "read_torch", "sharded_pass", "texts_digest", "write_json", "write_npz",
    "write_text",
]
