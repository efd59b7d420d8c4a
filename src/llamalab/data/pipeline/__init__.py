"""The LLaMA pretraining-data pipeline on datatrove: raw dumps of seven sources -> filtered,
deduplicated JSONL -> a sampled mixture -> token shards (``llamalab data run CONFIG``).

- `config`: the TOML run description (`load_config`).
- `engine`: builds each source's datatrove pipeline and runs it on a local, Ray or Slurm executor.
- `common`: steps every source shares (language ID, exact dedup, rejects).
- `readers`: JSONL, WET/WARC and plain-text readers that turn bad input into rejects.
- `commoncrawl`: CCNet's steps; `sources/`: the other six sources.
- `mixture`: proportional, seeded sampling of the sources into token shards.
- `report`: the per-source, per-step table of documents in/out and drop reasons.
"""

from __future__ import annotations
