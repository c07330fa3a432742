"""lm-evaluation-harness end to end against a real server, offline (no network: the task ships in tests/data).

`lm-eval run --model local-completions` sends `/v1/completions` with echo, logprobs and max_tokens 1 for the
multiple-choice task and reads the prompt tokens' logprobs (tokenizing through the server's /tokenizer_info
and /tokenize); `local-chat-completions` runs the generate_until task through /v1/chat/completions. The
multiple-choice log-likelihoods must be what `LLM.score` computes offline for the same (context, choice)
pairs, so the accuracy is the same.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxserve import LLM

from server_process import launch, stop, wait_ready

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parent.parent
TASKS = "tests/data/lm_eval"
ITEMS = [json.loads(line) for line in (ROOT / TASKS / "items.jsonl").read_text().splitlines()]
SERVER_ARGS = ["--host", "127.0.0.1", "--port", "0", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
               "--max-model-len", "512", "--kv-cache-memory", "64MiB"]


def lm_eval(model: str, url: str, tasks: str, out: Path, *extra: str) -> dict:
    """Runs the lm-eval CLI from the repository root; returns its results JSON (samples are next to it)."""
    lm_eval_bin = shutil.which("lm-eval", path=str(Path(sys.executable).parent)) or "lm-eval"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY="unused",
               TOKENIZERS_PARALLELISM="false")
    args = [lm_eval_bin, "run", "--model", model, "--model_args",
            f"base_url={url},model=SmolLM2-135M-Instruct,num_concurrent=4,max_retries=1" + "".join(extra[:1]),
            "--include_path", TASKS, "--tasks", tasks, "--output_path", str(out), "--log_samples", *extra[1:]]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout[-2000:])  # the harness's table, for the log
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    return json.loads(Path(results).read_text())


def samples(out: Path, task: str) -> list[dict]:
    (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in Path(path).read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_lm_eval_local_completions_and_chat_match_offline_scoring(tmp_path):
    proc = launch(SERVER_ARGS, tmp_path / "server.log")  # warms up while the offline engine scores
    try:
        llm = LLM(max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=64 * 2**20)
        contexts = [f"Question: {item['question']}\nAnswer:" for item in ITEMS for _ in item["choices"]]
        choices = [" " + c for item in ITEMS for c in item["choices"]]
        offline = np.array([s.sum_logprob for s in llm.score(contexts, choices, use_tqdm=False)])
        del llm
        srv = wait_ready(proc, tmp_path / "server.log")

        res = lm_eval("local-completions", srv.url + "/v1/completions", "jaxserve_tiny_mc", tmp_path / "mc",
                      ",tokenizer_backend=remote")
        served, k = [], 0
        for s, item in zip(samples(tmp_path / "mc", "jaxserve_tiny_mc"), ITEMS):
            assert s["doc"] == item
            served += [float(r[0]) for r in s["filtered_resps"]]
        served = np.array(served)
        assert served.shape == offline.shape
        assert np.abs(served - offline).max() <= 1e-4
        acc_offline, k = [], 0
        for item in ITEMS:
            n = len(item["choices"])
            acc_offline.append(float(np.argmax(offline[k:k + n]) == item["answer"]))
            k += n
        acc = res["results"]["jaxserve_tiny_mc"]["acc,none"]
        assert acc == pytest.approx(np.mean(acc_offline), abs=1e-12)
        assert 0.25 < acc  # better than chance on questions this easy

        res = lm_eval("local-chat-completions", srv.url + "/v1/chat/completions", "jaxserve_tiny_gen",
                      tmp_path / "gen", "", "--apply_chat_template")
        assert 0.0 <= res["results"]["jaxserve_tiny_gen"]["exact_match,strip"] <= 1.0
        answers = [s["resps"][0][0] for s in samples(tmp_path / "gen", "jaxserve_tiny_gen")]
        assert len(answers) == len(ITEMS) and all(isinstance(a, str) and a.strip() for a in answers)
    finally:
        stop(proc)
