"""Post-training: supervised fine-tuning and preference data (more methods to come).

- `data`: JSONL conversations, prompt/completion and preference pairs -> token samples with loss
  and formatting masks in the model's own chat format, bad records set aside with their line
  numbers, packing with document ids and per-sample positions, padded batches.

Nothing is imported here, so that importing the package (e.g. for a CLI's ``--help``) pulls in
neither torch nor numpy: ``from llamalab.finetune.data import ...``.
"""

from __future__ import annotations
