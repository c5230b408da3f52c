"""Sequence-level KD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation", Sec. 3.2):

    L_SeqKD = - sum_{s in train} log q(y_hat(s) | s),   y_hat(s) ~= argmax_y p_teacher(y | s)

the teacher's sequence distribution is replaced by its mode, so the student is trained with plain
maximum likelihood (:class:`kdlab.methods.base.MLE`, SFT's loss) on the teacher's own responses to the
training prompts instead of the gold ones.

Decoding: Kim & Rush approximate the mode with beam search (beam 5): ``generation.num_beams`` (default 1,
greedy, the cheapest mode approximation and five times cheaper on a CPU; set 5 for the paper), and
``generation.do_sample=true`` trains on samples instead. Each
response is the generated tokens up to and including the teacher's EOS, cut so that prompt + response
fits ``dataset.max_length``. A response cut by ``max_new_tokens`` or ``max_length`` ends without EOS, as
``kdlab.data.encode`` treats cut gold responses: the student is never taught a stop the teacher did
not make.

Cache: responses are generated once (batched, KV cache, under ``torch.no_grad()``) and stored in
``<cache_dir>/<teacher>-<hash>/responses.jsonl`` (one ``{"prompt_ids", "response_ids", "response"}``
line per distinct prompt, next to a ``manifest.json``), where the hash covers the teacher section, the
compute dtype, ``dataset.max_length``, the generation settings (not the batch size) and the prompts'
token ids (so dataset, template and tokenizer). The folder is written under a temporary name and
renamed, so a crashed job leaves no partial cache; later jobs and seeds with the same key reuse it.

Across tokenizers (``divergence=uld`` selects the student's own tokenizer; no divergence is used): the
teacher generates from its own rendering of each prompt (its template and tokens) and its response,
as text, is re-encoded with the student's tokenizer after the student's prompt, ending with the
student's EOS exactly when the teacher stopped (kdlab.alignment); the cache stores the student's tokens.

Dropout stays on in the student: the loss is MLE on fixed responses (SFT's).

Where kdlab still departs from the paper:

- Greedy decoding by default where Kim & Rush use beam search with beam 5 (``generation.num_beams=5``).
- Only Seq-KD: the paper's Seq-Inter (fine-tuning towards the beam candidate closest to the gold
  response) and its combination with word-level KD are not provided (word-level KD is ``method=kd``).
- The teacher's responses are generated once, before training, for the distinct training prompts; a
  response cut by ``max_new_tokens`` or ``max_length`` has no EOS.
"""
from __future__ import annotations

import json
from pathlib import Path


from kdlab import runlock
from kdlab.alignment import token_bytes
from kdlab.checkpoint import atomic_dir
from kdlab.config import ConfigError, Range, Type, check_section, content_key, plain
from kdlab.data import Encoded, left_pad
from kdlab.distributed import barrier, gather_objects
from kdlab.generation import SAMPLING_SCHEMA
from kdlab.loggers import progress
from kdlab.methods.base import MLE, Method

GENERATION_SCHEMA = {
    **SAMPLING_SCHEMA,
    "do_sample": Type(bool),
    "no_repeat_ngram_size": Range(0, integer=True),
    "seed": Range(0, integer=True),
    "batch_size": Range(1, integer=True),
    "num_beams": Range(1, integer=True),
}


class SeqKD(MLE):
    name = "seqkd"
    teacher_needs = frozenset({"generation"})   # MLE on the responses the teacher writes (prepare_data)
    schema = {
        **Method.schema,
        "generation": Type(dict),
        "cache_dir": Type(str),
        "teacher": Type(dict),
        "dtype": Type(str),
        "max_length": Range(1, integer=True),
    }
    # across tokenizers the teacher writes in its own tokens, re-encoded as text for the student (live only)
    teacher_needs_across = frozenset({"generation", "other_tokenizer"})

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        check_section("method.generation", cfg.generation, GENERATION_SCHEMA)
        if cfg.generation.do_sample and cfg.generation.num_beams > 1:
            raise ConfigError(f"method.generation.do_sample=true with num_beams={cfg.generation.num_beams}: beam "
                              f"sampling is not supported; set num_beams=1 to sample or do_sample=false for beam search")

    def cache_folder(self, prompts: list[list[int]]) -> Path:
        gen = {k: v for k, v in plain(self.cfg.generation).items() if k != "batch_size"}
        teacher = {k: v for k, v in plain(self.cfg.teacher).items() if k != "cache"}
        key = {"teacher": teacher, "dtype": self.cfg.dtype, "max_length": self.cfg.max_length, "generation": gen,
               "eos": self.ctx.tokenizer.eos_token_id, "cross_tokenizer": self.ctx.cross_tokenizer is not None,
               "prompts": content_key(prompts, digits=40)}
        return Path(self.cfg.cache_dir).expanduser() / f"{teacher['name']}-{content_key(key, digits=16)}"

    def prepare_data(self, train_items: list) -> list:
        """The training items with the gold responses replaced by the teacher's (generated or cached).

        Distributed: every rank generates (a ZeRO-3 teacher needs all ranks in each forward), rank 0
        writes, and every rank then reads rank 0's file (when the cache folder is shared), so all ranks
        train on the same responses; whether the cache exists is rank 0's view, so all ranks agree."""
        prompts = list(dict.fromkeys(tuple(it.prompt_ids) for it in train_items))
        folder = self.cache_folder([list(p) for p in prompts])
        path = folder / "responses.jsonl"
        responses = None
        if gather_objects(path.exists())[0]:
            print(f"kdlab: seqkd: reusing the teacher's responses in {path}")
        else:
            responses = (self.generate_responses(prompts) if self.ctx.cross_tokenizer is None
                         else self.responses_across_tokenizers(train_items))
            if self.ctx.runtime.is_main:
                self.write_cache(folder, responses)
                print(f"kdlab: seqkd: wrote the teacher's responses to {path}")
            barrier()
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            responses = {tuple(r["prompt_ids"]): r["response_ids"] for r in lines}
        return [Encoded(it.prompt_ids, responses[tuple(it.prompt_ids)], it.example) for it in train_items]

    def write_cache(self, folder: Path, responses: dict) -> None:
        tok = self.ctx.tokenizer
        runlock.remove_stale_temporaries(folder.parent)   # what killed writes of this store left
        with atomic_dir(folder) as tmp:
            (tmp / "responses.jsonl").write_text("".join(
                json.dumps({"prompt_ids": list(p), "response_ids": r, "response": tok.decode(r)}) + "\n"
                for p, r in responses.items()))
            (tmp / "manifest.json").write_text(json.dumps(
                {"teacher": plain(self.cfg.teacher), "generation": plain(self.cfg.generation),
                 "dtype": self.cfg.dtype, "max_length": self.cfg.max_length, "prompts": len(responses)},
                indent=2) + "\n")

    def responses_across_tokenizers(self, train_items: list) -> dict[tuple[int, ...], list[int]]:
        """Student prompt -> the teacher's response to its own rendering of the prompt, in student tokens."""
        xt = self.ctx.cross_tokenizer
        s_tok, t_tok = xt.student_tok, xt.teacher_tok
        by_prompt = {tuple(it.prompt_ids): it for it in train_items}
        t_prompts = {p: tuple(t_tok.encode(xt.teacher_prompt(it.example), add_special_tokens=False))
                     for p, it in by_prompt.items()}
        # the teacher gets max_new_tokens of its own; the cut to max_length is made in student tokens below
        room = max(len(t) for t in t_prompts.values()) + self.cfg.generation.max_new_tokens
        generated = self.generate_responses(list(dict.fromkeys(t_prompts.values())), t_tok, limit=room)
        t_bytes = token_bytes(t_tok)
        out = {}
        for p, tp in t_prompts.items():
            resp = generated[tp]
            ended = bool(resp) and resp[-1] == t_tok.eos_token_id
            text = b"".join(t_bytes[i] for i in (resp[:-1] if ended else resp)).decode("utf-8", errors="replace")
            prompt_text = s_tok.decode(list(p))
            ids = s_tok.encode(prompt_text + text, add_special_tokens=False)[len(p):]
            out[p] = (ids + [s_tok.eos_token_id] * ended)[: self.cfg.max_length - len(p)]
        return out

    def generate_responses(self, prompts: list[tuple[int, ...]], tok=None, limit: int | None = None
                           ) -> dict[tuple[int, ...], list[int]]:
        g, runtime = self.cfg.generation, self.ctx.runtime
        tok = tok or self.ctx.tokenizer
        limit = limit or self.cfg.max_length
        order = sorted(prompts, key=len)    # similar lengths share a batch: less padding
        out = {}
        for i, start in enumerate(progress(range(0, len(order), g.batch_size), desc="seqkd: teacher generates")):
            chunk = order[start: start + g.batch_size]
            ids, mask = left_pad([list(p) for p in chunk], tok.pad_token_id)
            room = max(1, min(g.max_new_tokens, limit - len(chunk[0])))
            with runtime.autocast():
                gen = self.teacher_io.generate(
                    tok, ids.to(runtime.device), mask.to(runtime.device), max_new_tokens=room, do_sample=g.do_sample,
                    temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                    no_repeat_ngram_size=g.no_repeat_ngram_size, seed=g.seed + i if g.do_sample else None,
                    num_beams=g.num_beams)
            for prompt, row, keep in zip(chunk, gen.response_ids, gen.response_mask.bool()):
                out[prompt] = row[keep].tolist()[: limit - len(prompt)]
        return out


METHOD = SeqKD
