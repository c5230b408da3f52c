"""The served teacher (``teacher.serve.url``): an OpenAI-compatible ``/v1/completions`` endpoint scores the
job's sequences, so the teacher runs on its own machine and never has to fit beside the student.

``teacher.serve``: ``url`` (``http://host:port``), ``model`` (null: the one model the server lists),
``dialect`` (``auto``, ``vllm`` or ``openai-echo``), ``top_k`` (log-probs per position), ``timeout``
(seconds per request), ``max_concurrency`` (requests in flight), ``retries`` (of a timed-out, refused or
5xx request, with exponential backoff), ``api_key_env`` (the name of the environment variable holding the
key; the key itself is never in a config or a log).

Each sequence (prompt + response, unpadded) is one request with ``max_tokens: 1``; the server's prompt
log-probabilities give the teacher's top-k at every position. Two dialects, each stating its alignment:

- ``vllm`` (vLLM's OpenAI server, v0.6 on; SGLang's is not verified): the prompt is token ids,
  ``prompt_logprobs: k`` with ``return_tokens_as_token_ids: true``; ``choices[0].prompt_logprobs[i]`` maps
  token ids (as strings) to ``{"logprob", "rank", "decoded_token"}`` and is the distribution of token
  ``i`` given tokens ``< i`` (entry 0 is null), always including token ``i`` itself: row ``t`` (of token
  ``t + 1``) is entry ``t + 1``.
- ``openai-echo`` (llama.cpp's servers, e.g. llama-cpp-python's with ``--logits_all true``): the prompt is
  text, ``echo: true, logprobs: k``. Its echoed log-probs are *shifted by one*: ``top_logprobs[i]`` is the
  distribution that predicts token ``i + 1`` (row ``i``), and ``token_logprobs[i]`` is token ``i``'s
  log-prob under that same distribution, so it is never read. Except after a leading BOS token, which
  llama-cpp-python drops from the echo but not from the model's rows: then entry ``i`` is row ``i`` of the
  prompt *with* the BOS, the distribution of the echoed token ``i`` itself (:meth:`EchoDialect.entries`;
  chat templates such as SmolLM2's start with their BOS, ``<|im_start|>``). Entry 0 is null (row 0 is
  unknown), and entries of BOS tokens are left out. The server scores its own tokenisation of the text
  (``/extras/tokenize``, and the echoed token texts must be those tokens'): where it differs from kdlab's
  (llama.cpp's SmolLM2 tokenizer merges "?\n\n8" as "?", "\n\n", "8", transformers' as "?", "\n", "\n",
  "8": 1 in 8 synthetic examples), each kdlab row is the server's row after the token that ends at the
  same byte (the teacher's next-token distribution after the same text), and a response position inside
  one of the server's tokens is asked for alone (:meth:`EchoDialect.next_row_body`; so is the row before
  a BOS token inside a sequence, whose echo entry llama.cpp leaves out). ``top_logprobs`` is keyed by
  token *text*, which llama.cpp prints dropping bytes that are not UTF-8 and writing special tokens as
  "", so one text can stand for several tokens (291 of SmolLM2's ids print as "", 38 as " ": the space
  and " " + a lone UTF-8 lead byte such as the start of a curly quote) and the dict keeps one value per
  text. A text that one token prints as maps to it; a text several print as stands for the sequence's
  actual next token when that is one of them (the EOS ending each response), and is otherwise left out:
  which token it was is lost, so its mass stays in the tail (``EchoDialect.unresolved`` counts these;
  mapping " " to the space instead put a curly quote's log-prob on it, 3 nats off). A text no token
  prints as is refused.

``dialect: auto`` takes ``vllm`` when ``/v1/models`` says ``owned_by: vllm``, else ``openai-echo``.

Start-up probe (:func:`connect`), before anything trains: the server answers, serves ``model``, tokenises a
fixed sentence as kdlab does (same vocabulary), and its distributions, aligned as the dialect says, make
the sentence's actual next tokens likely (at least half in the top-k, and far more than under the
neighbouring alignments) with finite log-probs, for the sentence alone and after the BOS token. Any
failure is one line naming the URL and the problem.

What it gives (:class:`ServedTeacher`): the top-k, renormalised over the k tokens as divergences take it,
with the log of the mass outside them (``TopKLogProbs.tail``), at any sequence's positions (the data's,
or the student's samples), and generations (SeqKD). Requests of a batch run concurrently; for off-policy
methods the next batch's run while the student trains on this one (:meth:`ServedTeacher.prefetch`).
Mid-run, a request that still fails after ``retries`` raises :class:`kdlab.modeling.TeacherFault`: the
trainer writes the checkpoint of the last complete step and the same command resumes the job.
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from urllib import error, request

import torch

from kdlab.config import ConfigError, OneOf, Range, Type, check_section, plain
from kdlab.divergences import TopKLogProbs
from kdlab.divergences.base import LOG_ZERO
from kdlab.modeling import ModelUnavailable, TeacherFault
from kdlab.teacher.interface import Teacher

SCHEMA = {
    "url": Type(str, optional=True),
    "model": Type(str, optional=True),
    "dialect": OneOf("auto", "vllm", "openai-echo"),
    "top_k": Range(1, integer=True),
    "timeout": Range(0, low_open=True),
    "max_concurrency": Range(1, integer=True),
    "retries": Range(0, integer=True),
    "api_key_env": Type(str, optional=True),
}
DEFAULTS = {"url": None, "model": None, "dialect": "auto", "top_k": 20, "timeout": 120.0, "max_concurrency": 4,
            "retries": 4, "api_key_env": None}
PROBE_SENTENCE = ("The capital of France is Paris. It is the largest city in the country, and many people visit "
                  "it every year to see its museums, its old streets and the Eiffel Tower.")


def validate_serve(key: str, value) -> None:
    """The ``teacher.serve`` check of :data:`kdlab.teacher.SCHEMA` (null: no server)."""
    if value is None:
        return
    if not isinstance(plain(value), dict):
        raise ConfigError(f"{key}={value!r} is not a mapping; set {key}.url=http://host:port or {key}=null")
    section = {**DEFAULTS, **plain(value)}
    check_section(key, section, SCHEMA, ignore=())
    url = section["url"]
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{key}.url={url} is not an http(s) URL; set {key}.url=http://host:port")
    env = section["api_key_env"]
    if url and env and not os.environ.get(env):
        raise ConfigError(f"{key}.api_key_env={env}: that environment variable is not set; export {env}=<key> "
                          f"(the key never goes into the config)")


class ServerError(ModelUnavailable):
    """The server answered with something kdlab cannot use (one line naming the URL)."""


class Client:
    """JSON over HTTP with retries: a refused connection, a timeout, 429 or 5xx is retried ``retries`` times
    with exponential backoff (1, 2, 4, ... s, at most 30), then raises :class:`TeacherFault`. Proxies are
    not used (teacher servers sit on the job's own network)."""

    def __init__(self, url: str, timeout: float, retries: int, api_key: str | None, backoff: float = 1.0):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.opener = request.build_opener(request.ProxyHandler({}))

    def call(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self._once(path, body)
            except _Transient as err:
                problem = str(err)
                if attempt < retries:
                    time.sleep(min(self.backoff * 2 ** attempt, 30.0))
        raise TeacherFault(f"teacher server {self.url}{path}: {problem} (after {retries} retries)")

    def _once(self, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = request.Request(self.url + path, data=data, headers=self.headers,
                              method="GET" if body is None else "POST")
        try:
            with self.opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except error.HTTPError as err:
            detail = err.read()[:200].decode(errors="replace").replace("\n", " ")
            if err.code == 429 or err.code >= 500:
                raise _Transient(f"HTTP {err.code} ({detail})") from None
            raise ServerError(f"teacher server {self.url}{path} refused the request: HTTP {err.code} "
                              f"({detail})") from None
        except (error.URLError, TimeoutError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise _Transient(f"unreachable ({reason})") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"teacher server {self.url}{path} answered with something that is not JSON: "
                              f"{raw[:80]!r}") from None


class _Transient(Exception):
    pass


def _finite_logprob(value, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value > 1e-4:
        raise ValueError(f"{where} is {value!r}, not a finite log-probability")
    return float(value)


class Dialect:
    """How one kind of server is asked for prompt log-probs and how its answer lines up with the tokens."""

    name: str

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def scoring_body(self, ids: list[int], k: int, model: str) -> dict:
        raise NotImplementedError

    def rows(self, response: dict, ids: list[int]) -> list[dict[int, float] | None]:
        """Row ``t`` for ``t < len(ids) - 1``: ``{token id: log-prob}`` of the distribution of token ``t + 1``
        (None where the server gives none); raises ValueError naming what is wrong."""
        raise NotImplementedError

    def text(self, ids: list[int]) -> str:
        from kdlab.alignment import token_bytes

        return b"".join(token_bytes(self.tokenizer)[i] for i in ids).decode("utf-8")


class VLLMDialect(Dialect):
    name = "vllm"
    alignment = "prompt_logprobs[i] is the distribution of token i (entry 0 null): row t is entry t + 1"

    def scoring_body(self, ids, k, model):
        return {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k,
                "return_tokens_as_token_ids": True}

    def rows(self, response, ids):
        entries = response["choices"][0].get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            got = len(entries) if isinstance(entries, list) else entries
            raise ValueError(f"prompt_logprobs has {got} entries for a {len(ids)}-token prompt")
        rows = []
        for i, entry in enumerate(entries[1:], start=1):
            if not isinstance(entry, dict) or not entry:
                raise ValueError(f"prompt_logprobs[{i}] is {entry!r}, not a mapping of token ids")
            rows.append({int(tok): _finite_logprob(v["logprob"] if isinstance(v, dict) else v,
                                                   f"prompt_logprobs[{i}][{tok}]") for tok, v in entry.items()})
        return rows


class EchoDialect(Dialect):
    name = "openai-echo"
    alignment = "top_logprobs[i] is the distribution of token i + 1 (shifted by one; entry 0 null): row t is entry t"

    def __init__(self, tokenizer):
        from kdlab.alignment import token_bytes

        super().__init__(tokenizer)
        # the server's text of each token: its bytes decoded dropping what is not UTF-8, special tokens ""
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        spelled = token_bytes(tokenizer)
        self.texts = ["" if i in special else b.decode("utf-8", errors="ignore") for i, b in enumerate(spelled)]
        self.ids_of: dict[str, list[int]] = {}     # a text names every token that prints as it
        for i, text in enumerate(self.texts):
            self.ids_of.setdefault(text, []).append(i)
        self.unresolved = 0     # keys left out because they named several ids, none the actual next token
        self.bos = tokenizer.bos_token_id   # the token whose echoed entries llama.cpp leaves out

    def scoring_body(self, ids, k, model):
        # temperature 0 and no penalties: the one generated token must not disturb anything
        return {"model": model, "prompt": self.text(ids), "max_tokens": 1, "echo": True, "logprobs": k,
                "temperature": 0.0, "repeat_penalty": 1.0}

    def entries(self, echoed: list[str], ids: list[int]) -> list[int]:
        """The row (the position whose next token it predicts) of each echoed entry, as llama-cpp-python 0.3
        lays them out (``_create_completion``): a leading BOS is dropped from the echoed tokens but not from the
        model's rows, so entry ``n`` of token ``all_tokens[idx]`` (``all_tokens`` = ``ids`` without that BOS)
        holds row ``idx``; entries of BOS tokens are left out; only the prompt's tokens are echoed (the
        generated one is never evaluated). The echoed texts must be kdlab's tokens' (the same tokenisation)."""
        lead = 1 if ids and ids[0] == self.bos else 0
        rows = [idx for idx in range(len(ids) - lead) if ids[idx + lead] != self.bos]
        if len(echoed) not in (len(rows), len(rows) + 1):
            raise ValueError(f"the server echoed {len(echoed)} tokens for kdlab's {len(ids)}-token prompt: it "
                             f"tokenises the text differently")
        for n, idx in enumerate(rows):
            if echoed[n] != self.texts[ids[idx + lead]]:
                raise ValueError(f"the server's token {n} is {echoed[n]!r} where kdlab's is "
                                 f"{self.texts[ids[idx + lead]]!r}: it tokenises the text differently")
        return rows

    def rows(self, response, ids):
        logprobs = response["choices"][0].get("logprobs") or {}
        echoed, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
        if not isinstance(echoed, list) or not isinstance(tops, list) or len(echoed) != len(tops):
            raise ValueError("logprobs lacks tokens/top_logprobs of equal length (is echo supported?)")
        rows: list[dict[int, float] | None] = [None] * (len(ids) - 1)
        for n, i in enumerate(self.entries(echoed, ids)):
            if i == len(ids) - 1 or tops[n] is None:   # the generated token's row; entry 0 (nulled)
                continue
            rows[i] = self.row(tops[n], ids[i + 1], f"top_logprobs[{n}]")
        return rows

    def row(self, top, actual_next: int, where: str) -> dict[int, float]:
        """``{token id: log-prob}`` of one ``top_logprobs`` entry keyed by token text (see the module docstring)."""
        if not isinstance(top, dict) or not top:
            raise ValueError(f"{where} is {top!r}, not a mapping of token texts")
        row = {}
        for text, value in top.items():
            value = _finite_logprob(value, f"{where}[{text!r}]")
            candidates = self.ids_of.get(text)
            if candidates is None:
                raise ValueError(f"{where} key {text!r} is no token of kdlab's tokenizer: the server's vocabulary "
                                 f"differs")
            if len(candidates) > 1 and actual_next in candidates:
                candidates = [actual_next]
            if len(candidates) == 1:
                row[candidates[0]] = value
            else:   # which token it was is lost: its mass stays in the tail, outside the top-k
                self.unresolved += 1
        return row

    def next_row_body(self, prefix: list[int], k: int, model: str) -> dict:
        """A request for the distribution after ``prefix`` alone: without echo, ``top_logprobs[0]`` is that of
        the generated token, not shifted (for a row the echo lacks: after a BOS token inside the sequence, or
        inside one of the server's tokens)."""
        return {"model": model, "prompt": self.text(prefix), "max_tokens": 1, "logprobs": k, "temperature": 0.0,
                "repeat_penalty": 1.0}


    def realign(self, rows: list, server_ids: list[int], ids: list[int]) -> list:
        """Rows of the server's tokenisation of the text as rows of kdlab's: the server's row after the token
        that ends at the same byte as kdlab's token ``t`` (the teacher's next-token distribution after the same
        text); None where the server has no token boundary there (llama.cpp's SmolLM2 tokenizer merges
        "?\n\n8" as "?", "\n\n", "8" where transformers' splits "\n", "\n")."""
        from itertools import accumulate

        from kdlab.alignment import token_bytes

        spelled = token_bytes(self.tokenizer)
        if not isinstance(server_ids, list) or not all(isinstance(i, int) and 0 <= i < len(spelled)
                                                       for i in server_ids):
            raise ValueError(f"/extras/tokenize answered {str(server_ids)[:80]}, not token ids of kdlab's vocabulary")
        server_row = {end: j for j, end in enumerate(accumulate(len(spelled[i]) for i in server_ids[:-1]))}
        ends = list(accumulate(len(spelled[i]) for i in ids[:-1]))
        return [rows[server_row[end]] if end in server_row else None for end in ends]


DIALECTS = {d.name: d for d in (VLLMDialect, EchoDialect)}


class ServedTeacher(Teacher):
    kind = "served"
    provides = frozenset({"data_distribution", "distribution", "generation"})

    def __init__(self, client: Client, dialect: Dialect, model: str, top_k: int, max_concurrency: int):
        self.client, self.dialect, self.model_name, self.top_k = client, dialect, model, top_k
        self.pool = ThreadPoolExecutor(max_concurrency)
        self.pending: dict[tuple[int, ...], object] = {}     # sequence -> Future of its rows (prefetch)

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, ids: list[int]) -> list[dict[int, float] | None]:
        try:
            body = self.dialect.scoring_body(ids, self.top_k, self.model_name)
        except UnicodeDecodeError:
            raise TeacherFault(f"teacher server {self.client.url} ({self.dialect.name}) takes text, and a sequence's "
                               f"tokens are not UTF-8 text; use a server that takes token ids (dialect=vllm)") from None
        # a text-prompt server scores its own tokenisation of the text, which may differ from kdlab's
        server_ids = ids if self.dialect.name == "vllm" else self.client.call(
            "/extras/tokenize", {"input": body["prompt"]}).get("tokens")
        response = self.client.call("/v1/completions", body)
        try:
            rows = self.dialect.rows(response, server_ids)
            return rows if server_ids == ids else self.dialect.realign(rows, server_ids, ids)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise TeacherFault(f"teacher server {self.client.url} ({self.dialect.name}): {err}") from None

    def _submit(self, ids: tuple[int, ...]):
        if ids not in self.pending:
            self.pending[ids] = self.pool.submit(self.score, list(ids))
        return self.pending[ids]

    def _sequences(self, batch) -> list[tuple[int, ...]]:
        lengths = batch.attention_mask.sum(dim=1).tolist()
        return [tuple(row[:n]) for row, n in zip(batch.input_ids.tolist(), lengths)]

    def prefetch(self, batch) -> None:
        for ids in self._sequences(batch):
            self._submit(ids)

    def _response_rows(self, batch) -> list[dict[int, float]]:
        """The rows at ``batch``'s response positions, row-major, all sequences' requests in flight at once."""
        seqs = self._sequences(batch)
        futures = [self._submit(ids) for ids in seqs]
        out = []
        for ids, future, mask in zip(seqs, futures, batch.response_mask.tolist()):
            try:
                rows = future.result()
            finally:
                self.pending.pop(ids, None)
            for t, keep in enumerate(mask[: len(ids) - 1]):
                if keep:
                    out.append(rows[t] if rows[t] is not None else self.next_row(ids, t))
        return out

    def next_row(self, ids: tuple[int, ...], t: int) -> dict[int, float]:
        """Row ``t`` of ``ids`` asked for alone (a response position the scoring answer left without one)."""
        fault = f"teacher server {self.client.url} ({self.dialect.name}) gave no log-probs at position {t} of a " \
                f"{len(ids)}-token sequence, a response position"
        if not hasattr(self.dialect, "next_row_body"):
            raise TeacherFault(fault)
        try:
            body = self.dialect.next_row_body(list(ids[: t + 1]), self.top_k, self.model_name)
        except UnicodeDecodeError:
            raise TeacherFault(f"{fault}, and the text before it is not UTF-8 to ask for it alone") from None
        logprobs = self.client.call("/v1/completions", body)["choices"][0].get("logprobs") or {}
        try:
            return self.dialect.row((logprobs.get("top_logprobs") or [None])[0], ids[t + 1], "top_logprobs[0]")
        except ValueError as err:
            raise TeacherFault(f"{fault}; asked alone: {err}") from None

    def distribution(self, batch) -> TopKLogProbs:
        return self.topk(batch, self.top_k)

    def topk(self, batch, k: int) -> TopKLogProbs:
        """The top-``k`` at the response positions (``k`` at most ``teacher.serve.top_k``), renormalised over
        the k entries, and the tail's log-mass."""
        if k > self.top_k:
            raise ConfigError(f"top-{k} asked of a server queried for teacher.serve.top_k={self.top_k}; set "
                              f"teacher.serve.top_k={k} or ask for fewer")
        rows = self._response_rows(batch)
        values = torch.full((len(rows), k), LOG_ZERO, dtype=torch.float64)   # 1 - mass cancels: float64
        indices = torch.zeros((len(rows), k), dtype=torch.long)
        for r, row in enumerate(rows):
            top = sorted(row.items(), key=lambda kv: -kv[1])[:k]
            # fewer than k entries (texts that collided on the server): the rest are distinct unused ids, p = 0
            unused = (i for i in range(len(row) + k) if i not in row)
            ids = [i for i, _ in top] + [next(unused) for _ in range(k - len(top))]
            indices[r] = torch.tensor(ids)
            values[r, : len(top)] = torch.tensor([v for _, v in top])
        kept = torch.logsumexp(values, dim=-1, keepdim=True)
        tail = torch.log(-torch.expm1(kept.clamp(max=-1e-30))).squeeze(-1)
        device = batch.input_ids.device
        return TopKLogProbs((values - kept).float().to(device), indices.to(device), tail.float().to(device))

    # -- generation (SeqKD) --------------------------------------------------------------------------
    def generate(self, tokenizer, prompt_ids, prompt_mask, *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, no_repeat_ngram_size: int = 0,
                 seed: int | None = None, num_beams: int = 1):
        """The server's continuations (greedy, or sampled with these settings), as kdlab tokens ending with
        EOS where the server stopped on it."""
        from kdlab.generation import Generated

        if num_beams > 1 or no_repeat_ngram_size:
            raise ConfigError(f"a served teacher ({self.client.url}) generates greedily or by sampling: set "
                              f"method.generation.num_beams=1 and no_repeat_ngram_size=0")
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
        all_tokens = -1 if self.dialect.name == "vllm" else 0     # top_k that disables top-k sampling
        settings = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                    "top_p": top_p if do_sample else 1.0, "top_k": top_k if do_sample and top_k else all_tokens,
                    **({"seed": seed} if seed is not None else {})}
        if self.dialect.name != "vllm":   # llama.cpp's own defaults (min_p 0.05, repeat_penalty 1.1) would filter
            settings |= {"min_p": 0.0, "repeat_penalty": 1.0}
        responses = list(self.pool.map(lambda p: self._continue(tokenizer, p, settings), prompts))
        width = max(1, max(len(r) for r in responses))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, r in enumerate(responses):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r, dtype=torch.long), 1
        return Generated(prompt_ids, prompt_mask, ids.to(prompt_ids.device), mask.to(prompt_ids.device))

    def _continue(self, tokenizer, prompt: list[int], settings: dict) -> list[int]:
        body = {"model": self.model_name, **settings}
        if self.dialect.name == "vllm":
            body |= {"prompt": prompt, "logprobs": 0, "return_tokens_as_token_ids": True}
        else:
            body["prompt"] = self.dialect.text(prompt)
        choice = self.client.call("/v1/completions", body)["choices"][0]
        if self.dialect.name == "vllm":
            response = [int(t.removeprefix("token_id:")) for t in (choice.get("logprobs") or {}).get("tokens", [])]
        else:   # text: re-encoded after the prompt, as kdlab.data.encode lays out prompt + response
            full = tokenizer.encode(self.dialect.text(prompt) + choice["text"], add_special_tokens=False)
            response = full[len(prompt):] if full[: len(prompt)] == prompt else tokenizer.encode(
                choice["text"], add_special_tokens=False)
        eos = tokenizer.eos_token_id
        if choice.get("finish_reason") == "stop" and (not response or response[-1] != eos):
            response.append(eos)
        return response[: response.index(eos) + 1] if eos in response else response


def _served_model(client: Client, wanted: str | None) -> tuple[str, str]:
    """``(model id, owner)`` of the served model: ``wanted``, or the only one listed."""
    listed = client.call("/v1/models", retries=0).get("data") or []
    names = {m.get("id"): m.get("owned_by", "") for m in listed if isinstance(m, dict)}
    if wanted is not None:
        if wanted not in names:
            raise ServerError(f"teacher server {client.url} serves {sorted(names)}, not teacher.serve.model={wanted}; "
                              f"start it with that model or set teacher.serve.model to one of those")
        return wanted, names[wanted]
    if len(names) != 1:
        raise ServerError(f"teacher server {client.url} lists {len(names)} models ({sorted(names)}); name one with "
                          f"teacher.serve.model=<id>")
    return next(iter(names.items()))


def check_alignment(rows: list[dict[int, float] | None], ids: list[int], k: int, url: str, dialect: Dialect) -> None:
    """The probe's test of a dialect's alignment: the sentence's actual next tokens must be in the top-k of
    their rows at least half the time, and at least twice as often as under the rows one step off."""
    def hits(shift: int) -> int:
        return sum(1 for t in range(len(ids) - 1) if 0 <= t + shift < len(rows) and rows[t + shift] is not None
                   and ids[t + 1] in sorted(rows[t + shift], key=rows[t + shift].get, reverse=True)[:k])
    scored = sum(r is not None for r in rows)
    aligned, off = hits(0), max(hits(-1), hits(1))
    if scored < len(ids) // 2 or aligned < scored / 2 or aligned < 2 * off:
        raise ServerError(f"teacher server {url}: its log-probs do not line up with the tokens as dialect "
                          f"{dialect.name} says ({dialect.alignment}): {aligned} of {scored} next tokens in the "
                          f"top-{k} (one position off: {off}); set teacher.serve.dialect to the server's kind")


def connect(serve, tokenizer) -> ServedTeacher:
    """The served teacher after the start-up probe (see the module docstring); one line on any failure."""
    cfg = {**DEFAULTS, **plain(serve)}
    url = cfg["url"].rstrip("/")
    key = os.environ.get(cfg["api_key_env"]) if cfg["api_key_env"] else None
    client = Client(url, cfg["timeout"], cfg["retries"], key)
    try:
        model, owner = _served_model(client, cfg["model"])
    except TeacherFault as err:
        raise ServerError(f"teacher server {url} is unreachable ({str(err).split(': ', 1)[-1]}); start it or fix "
                          f"teacher.serve.url") from None
    name = cfg["dialect"] if cfg["dialect"] != "auto" else ("vllm" if owner == "vllm" else "openai-echo")
    dialect = DIALECTS[name](tokenizer)
    ids = tokenizer.encode(PROBE_SENTENCE, add_special_tokens=False)
    tokenize = ("/tokenize", {"model": model, "prompt": PROBE_SENTENCE, "add_special_tokens": False}) \
        if name == "vllm" else ("/extras/tokenize", {"input": PROBE_SENTENCE})
    server_ids = client.call(*tokenize, retries=0).get("tokens")
    if server_ids != ids:
        raise ServerError(f"teacher server {url} tokenises differently from the student's tokenizer (a probe "
                          f"sentence: {server_ids[:8] if isinstance(server_ids, list) else server_ids}... vs "
                          f"kdlab's {ids[:8]}...): serve a model with the student's vocabulary")
    # the sentence alone, and after the BOS token where there is one (chat templates start with it)
    bos = tokenizer.bos_token_id
    for probe in [ids] + ([[bos] + ids] if bos is not None and bos != tokenizer.eos_token_id else []):
        try:
            rows = dialect.rows(client.call("/v1/completions", dialect.scoring_body(probe, cfg["top_k"], model),
                                            retries=0), probe)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ServerError(f"teacher server {url} ({name}): malformed log-probs on the probe sentence: {err}") \
                from None
        except TeacherFault as err:
            raise ServerError(f"teacher server {url} answered /v1/models but not the probe sentence's scoring "
                              f"({str(err).split(': ', 1)[-1]}): read the server's log (a llama.cpp server that "
                              f"crashes here may be built with kernels this machine cannot run, e.g. AMX on a "
                              f"virtual machine: rebuild it with CMAKE_ARGS=-DGGML_NATIVE=OFF)") from None
        short = [t for t, row in enumerate(rows) if row is not None and len(row) < min(cfg["top_k"], 2)]
        if short:
            raise ServerError(f"teacher server {url}: {len(short)} probe positions have fewer than 2 log-probs "
                              f"(asked for top_k={cfg['top_k']}); is --logits_all on?")
        check_alignment(rows, probe, cfg["top_k"], url, dialect)
    return ServedTeacher(client, dialect, model, cfg["top_k"], cfg["max_concurrency"])
