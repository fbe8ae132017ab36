"""In-process transformers backend: batched `generate` on CPU or one GPU. The CPU default and test path.

    teacher = HFGenerator(TeacherConfig(model="Qwen/Qwen2.5-1.5B-Instruct"))
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.generators.base import (
    Blocking,
    Completion,
    Request,
    cut_at_stop,
    teacher_name,
    use_chat,
    with_prefill,
)
from selfinstruct.modeling import load_model_and_tokenizer


class _Penalties(LogitsProcessor):
    """OpenAI/vLLM presence and frequency penalties over the tokens generated so far."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class HFGenerator(Blocking):
    """Groups requests with equal sampling parameters and generates them in length-sorted batches."""

    enforces_choices = True  # a request with choices gets the most likely one (_choose)

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.name = teacher_name(cfg)[0]
        self.model, self.tok = load_model_and_tokenizer(cfg.model, cfg.engine.device, cfg.engine.dtype,
                                                        cfg.trust_remote_code, "teacher")
        if cfg.lora_path:  # a student: base + LoRA, prompted with the chat template it was trained with
            from peft import PeftModel
            from transformers import AutoTokenizer

            self.model = PeftModel.from_pretrained(self.model, cfg.lora_path).eval()
            if (Path(cfg.lora_path) / "tokenizer_config.json").exists():
                self.tok = AutoTokenizer.from_pretrained(cfg.lora_path)
        self.tok.padding_side = "left"  # decoder-only batched generation appends on the right
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.chat = use_chat(cfg, bool(getattr(self.tok, "chat_template", None)))
        self.counts: Counter = Counter()

    @property
    def stats(self) -> dict:
        return dict(self.counts)

    def close(self) -> None:
        self.model = None

    def _encode(self, req: Request | str) -> str:
        req = req if isinstance(req, Request) else Request(req, Sampling())
        if not self.chat:
            return req.prompt
        return self.tok.apply_chat_template(req.messages(), tokenize=False, add_generation_prompt=not req.prefill,
                                            continue_final_message=bool(req.prefill))

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        results: list[list[Completion | None]] = [[None] * r.sampling.n for r in requests]
        groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for i, r in enumerate(requests):
            if r.choices:  # answered by comparing the choices' likelihoods, not by sampling
                results[i] = [self._choose(r)] * r.sampling.n
                continue
            s = r.sampling
            key = (s.temperature, s.top_p, s.max_tokens, s.presence_penalty, s.frequency_penalty, tuple(s.stop))
            groups[key].extend((i, k) for k in range(s.n))
        texts = [self._encode(r) for r in requests]
        for jobs in groups.values():
            jobs.sort(key=lambda job: -len(texts[job[0]]))  # similar lengths together: less padding
            for start in range(0, len(jobs), self.cfg.engine.batch_size):
                chunk = jobs[start: start + self.cfg.engine.batch_size]
                seeds = [(requests[i].sampling.seed or 0, k) for i, k in chunk]
                outs = self._batch([texts[i] for i, _ in chunk], requests[chunk[0][0]].sampling, seeds)
                for (i, k), out in zip(chunk, outs, strict=True):
                    results[i][k] = Completion(with_prefill(requests[i], out.text, self.chat), out.finish_reason)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _choose(self, req: Request) -> Completion:
        """The most likely of `req.choices` as the whole answer (each followed by the end of the turn in chat
        form): the sum of its tokens' log-probabilities after the prompt, all choices in one batch."""
        prompt = self.tok(self._encode(req), add_special_tokens=not self.chat)["input_ids"]
        end = [self.tok.eos_token_id] if self.chat and self.tok.eos_token_id is not None else []
        answers = [self.tok(c, add_special_tokens=False)["input_ids"] + end for c in req.choices]
        width = len(prompt) + max(map(len, answers))
        ids = torch.full((len(answers), width), self.tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, a in enumerate(answers):
            ids[row, : len(prompt) + len(a)] = torch.tensor(prompt + a)
            mask[row, : len(prompt) + len(a)] = 1
        logp = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)) \
            .logits.float().log_softmax(-1).cpu()
        scores = [sum(float(logp[row, len(prompt) + t - 1, tok]) for t, tok in enumerate(a))
                  for row, a in enumerate(answers)]
        self.counts["tokens_in"] += len(prompt)
        best = req.choices[max(range(len(scores)), key=scores.__getitem__)]
        return Completion(with_prefill(req, best, self.chat), "stop")

    @torch.inference_mode()
    def _batch(self, texts: list[str], s: Sampling, seeds: list[tuple[int, int]]) -> list[Completion]:
        # Seeded from the requests' own seeds (ints hash the same in every process): same run, same text.
        torch.manual_seed(hash(tuple(seeds)) & 0x7FFFFFFF)
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
        enc = enc.to(self.model.device)
        prompt_len = enc["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=s.max_tokens, pad_token_id=self.tok.pad_token_id, top_k=None)
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tok)
        if s.presence_penalty or s.frequency_penalty:
            kwargs["logits_processor"] = LogitsProcessorList(
                [_Penalties(prompt_len, s.presence_penalty, s.frequency_penalty)])
        out = self.model.generate(**enc, **kwargs)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tok.eos_token_id}
        completions = []
        self.counts["tokens_in"] += int(enc["attention_mask"].sum())
        for row in out[:, prompt_len:].tolist():
            ended = any(t in eos_ids for t in row)
            self.counts["tokens_out"] += next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            text, stopped = cut_at_stop(self.tok.decode(row, skip_special_tokens=True), s.stop)
            full = len(row) >= s.max_tokens and not ended and not stopped
            completions.append(Completion(text, "length" if full else "stop"))
        return completions

