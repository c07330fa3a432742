"""Offline batch generation in OpenAI's Batch API file formats, through the in-process engine.

Input, one JSON object a line: `{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}` (the body as the server takes it: messages or prompt, sampling fields).
Output, one a line, in the order requests finish: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`; the body is the server's response, or its `{"error": ...}` for a
request it would have refused with a 400. A line that is not a request at all (bad JSON, no custom_id, a
duplicate, an unknown url) gets `"response": null, "error": {"code", "message"}`.

The bodies go through the server's own parsing and preparation (`jaxserve.server.protocol`: parse_*,
tokenize_prompts, params_for_prompt, the response builders), so the batch and the server accept and
refuse the same requests and shape the same responses; guardrails and rate limits are the
server's and do not apply here. Every valid request is queued on the engine at once and the engine
batches them (continuous batching); each result is appended and flushed as soon as it is done, so an
interrupted run resumes by skipping the custom_ids already in the output (a torn last line is dropped).

Runs in the caller's thread: `run_batch` drives `engine.step()` itself (no engine thread).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from jaxserve.engine_client import OfflineEngineClient
from jaxserve.server import errors, protocol, tools
from jaxserve.server.errors import APIError

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


@dataclasses.dataclass
class _Job:
    custom_id: str
    request_id: str
    req: protocol.GenerationRequest
    streams: list = dataclasses.field(default_factory=list)
    texts: dict = dataclasses.field(default_factory=dict)  # (prompt, choice) -> text
    logprobs: dict = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict = dataclasses.field(default_factory=dict)  # (prompt, choice) -> the engine's entries
    finish: dict = dataclasses.field(default_factory=dict)
    num_tokens: dict = dataclasses.field(default_factory=dict)
    prompt_ids: list = dataclasses.field(default_factory=list)
    prompt_texts: list = dataclasses.field(default_factory=list)
    cached: int = 0


def batch_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def error_record(custom_id: str | None, code: str, message: str) -> dict:
    return {"id": batch_id(), "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def response_record(custom_id: str, request_id: str, status: int, body: dict) -> dict:
    return {"id": batch_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def read_done(path: Path) -> set[str]:
    """custom_ids already in the output; rewrites the file without a torn (unparseable) line."""
    if not path.exists():
        return set()
    lines = path.read_text().splitlines()
    good, done = [], set()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        good.append(line)
        if isinstance(record, dict) and record.get("custom_id") is not None:
            done.add(record["custom_id"])
    if len(good) != len(lines):
        path.write_text("".join(g + "\n" for g in good))
    return done


def parse_envelope(line: str, lineno: int) -> tuple[str, str, Any]:
    """(custom_id, kind, body) of one input line; raises `_LineError` for a line that is not a request."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(None, "invalid_json_line", f"line {lineno}: not JSON ({e})") from None
    if not isinstance(item, dict):
        raise _LineError(None, "invalid_request", f"line {lineno}: expected a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineError(None, "missing_custom_id", f"line {lineno}: 'custom_id' must be a non-empty string")
    body = item.get("body")
    url = item.get("url") or ("/v1/chat/completions" if isinstance(body, dict) and "messages" in body
                              else "/v1/completions")
    if url not in URLS:
        raise _LineError(custom_id, "invalid_url", f"line {lineno}: url must be one of {sorted(URLS)}, got {url!r}")
    if item.get("method", "POST") != "POST":
        raise _LineError(custom_id, "invalid_method", f"line {lineno}: method must be POST")
    return custom_id, URLS[url], body


def parse_body(kind: str, body: Any) -> protocol.GenerationRequest:
    """The server's validation of a request body; raises its 400 APIError."""
    req = protocol.parse_chat(body) if kind == "chat" else protocol.parse_completion(body)
    if req.stream:
        raise errors.bad_request("'stream' is not supported in a batch", param="stream")
    return req


class _LineError(Exception):
    def __init__(self, custom_id: str | None, code: str, message: str):
        super().__init__(message)
        self.custom_id, self.code, self.message = custom_id, code, message


def _prepare(engine: OfflineEngineClient, job: _Job) -> list:
    """Prompt ids and per-prompt params, exactly as the server prepares them (its 400s included)."""
    job.prompt_texts, job.prompt_ids = protocol.tokenize_prompts(job.req, engine.tokenizer)
    return [protocol.params_for_prompt(job.req.params, ids, engine.max_model_len, engine.validate, job.req.param)
            for ids in job.prompt_ids]


def _body(engine: OfflineEngineClient, job: _Job, model: str) -> dict:
    req, n = job.req, job.req.params.n

    def token_text(token_id: int) -> str:
        return engine.tokenizer.decode([token_id], skip_special_tokens=False)

    choices = []
    for p in range(len(job.prompt_ids)):
        prefix = job.prompt_texts[p] if req.echo else ""
        for i in range(n):
            entries = job.logprobs.get((p, i), [])
            logprobs = None
            if req.params.prompt_logprobs is not None:  # echo with logprobs (completions)
                logprobs = protocol.echo_logprobs(job.prompt_ids[p], job.prompt_logprobs.get((p, i)),
                                                  [] if req.score_only else entries, token_text, len(prefix))
            elif req.logprobs is not None:
                logprobs = (protocol.chat_logprobs(entries, token_text) if req.kind == "chat"
                            else protocol.completion_logprobs(entries, token_text, len(prefix)))
            text = prefix + ("" if req.score_only else job.texts.get((p, i), ""))
            if req.kind == "chat":
                content, calls, finish = tools.parse_message(req.tools, text, job.finish[(p, i)])
                choices.append(protocol.chat_choice(p * n + i, content, logprobs, finish, calls))
            else:
                choices.append(protocol.completion_choice(p * n + i, text, logprobs, job.finish[(p, i)]))
    completion = 0 if req.score_only else sum(job.num_tokens.values())
    usage = protocol.usage(sum(len(ids) for ids in job.prompt_ids), completion, job.cached)
    return protocol.response(req.kind, job.request_id, protocol.now(), model, choices, usage)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def run_batch(engine: OfflineEngineClient, input_path: str | Path, output_path: str | Path, *, model: str,
              progress: bool = True) -> dict:
    """Runs every request of `input_path` not yet in `output_path`; appends results. Returns a summary."""
    output_path = Path(output_path)
    done = read_done(output_path)
    seen: set[str] = set()
    summary = {"skipped": 0, "succeeded": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
    pending: list[_Job] = []
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "a") as out:

        def write(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()
            ok = record["error"] is None and record["response"]["status_code"] == 200
            summary["succeeded" if ok else "failed"] += 1

        for lineno, line in _lines(Path(input_path)):
            try:
                custom_id, kind, body = parse_envelope(line, lineno)
            except _LineError as e:
                write(error_record(e.custom_id, e.code, e.message))
                continue
            if custom_id in done:
                summary["skipped"] += 1
                continue
            if custom_id in seen:
                write(error_record(custom_id, "duplicate_custom_id",
                                   f"line {lineno}: custom_id {custom_id!r} was already used in this file"))
                continue
            seen.add(custom_id)
            request_id = protocol.new_id(kind)
            try:
                job = _Job(custom_id, request_id, parse_body(kind, body))
                params = _prepare(engine, job)
            except APIError as e:
                write(response_record(custom_id, request_id, e.status, e.to_dict()))
                continue
            try:
                for p, (ids, sp) in enumerate(zip(job.prompt_ids, params)):
                    job.streams.append(engine.add_request(ids, sp, request_id=f"{job.request_id}-{p}",
                                                         priority=job.req.priority))
            except ValueError as e:  # validated above, so only a change of engine limits gets here
                for stream in job.streams:
                    engine.abort(stream.request_id)
                write(response_record(custom_id, request_id, 400, errors.bad_request(str(e)).to_dict()))
                continue
            pending.append(job)

        start = time.perf_counter()
        generated = 0
        with tqdm(total=len(pending), desc="batch", unit="req", disable=not progress) as bar:
            while pending:
                engine.step()
                for job in list(pending):
                    for p, stream in enumerate(job.streams):
                        while True:
                            try:
                                delta = stream.get(timeout=0)
                            except queue.Empty:
                                break
                            key = (p, delta.index)
                            job.texts[key] = job.texts.get(key, "") + delta.new_text
                            job.logprobs.setdefault(key, []).extend(delta.logprobs or [])
                            if delta.prompt_logprobs is not None:
                                job.prompt_logprobs[key] = delta.prompt_logprobs
                            job.num_tokens[key] = max(job.num_tokens.get(key, 0), delta.num_output_tokens)
                            generated += len(delta.new_token_ids)
                            if delta.finished:
                                job.finish[key] = delta.finish_reason
                                job.cached += delta.num_cached_tokens if delta.index == 0 else 0
                                if delta.finish_reason == "error":
                                    job.finish[key] = "error:" + (delta.error or "engine error")
                    if len(job.finish) == len(job.streams) * job.req.params.n:
                        pending.remove(job)
                        write(_finished_record(engine, job, model))
                        summary["prompt_tokens"] += sum(len(ids) for ids in job.prompt_ids)
                        summary["completion_tokens"] += sum(job.num_tokens.values())
                        bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{generated / elapsed if elapsed else 0:.1f} tok/s", refresh=False)
        summary["seconds"] = time.perf_counter() - start
        summary["output_tokens_per_s"] = summary["completion_tokens"] / summary["seconds"] if summary["seconds"] else 0
    return summary


def _finished_record(engine, job: _Job, model: str) -> dict:
    failed = [reason for reason in job.finish.values() if reason.startswith("error:")]
    if failed:
        err = errors.engine_error(failed[0].removeprefix("error:"))
        return response_record(job.custom_id, job.request_id, err.status, err.to_dict())
    return response_record(job.custom_id, job.request_id, 200, _body(engine, job, model))
