"""The LLM as the paper's decoder: the log-score l(c, z, y) = log q(y | z, c) of a target y given z.

z is the sequence the LLM receives at the audio/image positions (the adapter output, or for text
the token embeddings of the transcript). Only the LLM runs: the prompt's token embeddings get z at
the modality positions, the text backbone runs once, and the LM head is applied only at the
positions whose next token is scored. z can carry gradients, so the same call gives L_log.

Targets (`target.name`):
* ``content``: y is the transcript/caption, teacher-forced as the assistant's answer right after
  the prompt, followed by the end-of-turn token (EOS); only answer tokens are scored.
* ``reference``: the earlier code's score, every next token of the prompt itself (template and
  placeholder ids included), kept only to compare with the paper's numbers.

``reduction`` sums the scored tokens' log-probs (log q of the whole target, Eq. 3's score) or
averages them (the earlier code's, which scales gradients by 1 / #targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mcollapse.errors import UserError
from mcollapse.models.base import ModelFamily
from mcollapse.models.roles import find_text_backbone

TARGETS = ("content", "reference")
REDUCTIONS = ("sum", "mean")
IGNORE = -100


@dataclass
class DecoderBatch:
    """Token rows with room for z, and which next tokens are scored.

    ``targets[b, t]`` is the token position t must predict (IGNORE where nothing is scored);
    ``z_rows``/``z_cols`` list the modality positions in order, matching ``z_mask`` (B, T_max).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    z_mask: torch.Tensor
    z_rows: torch.Tensor
    z_cols: torch.Tensor
    reduction: str

    @property
    def n_scored(self) -> torch.Tensor:
        return (self.targets != IGNORE).sum(dim=1)


def compose(family: ModelFamily, lengths: list[int], answers: list[list[int]] | None, target: str,
            reduction: str, parts: tuple[list[int], list[int]] | None = None) -> DecoderBatch:
    """Rows `prompt-before + [placeholder] * T_i + prompt-after (+ answer_i)`, right-padded.

    `parts` (token ids before/after the placeholder) replaces the model's configured prompt."""
    if target not in TARGETS:
        raise UserError(f"target '{target}' is not one of {', '.join(TARGETS)}")
    if reduction not in REDUCTIONS:
        raise UserError(f"target.reduction '{reduction}' is not one of {', '.join(REDUCTIONS)}")
    if target == "content" and (answers is None or len(answers) != len(lengths)):
        raise ValueError("target=content needs one answer token list per sample")
    pre, post = parts or family.prompt_token_parts()
    placeholder = family.placeholder_id
    rows, scored_from = [], []
    for i, length in enumerate(lengths):
        prompt = pre + [placeholder] * length + post
        if target == "content":
            if not answers[i]:
                raise ValueError("an empty answer cannot be scored")
            rows.append(prompt + answers[i])
            scored_from.append(len(prompt) - 1)  # the last prompt position predicts the first answer token
        else:
            rows.append(prompt)
            scored_from.append(0)
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), family.pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    targets = torch.full((batch, width), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        ids = torch.tensor(row, dtype=torch.long)
        input_ids[b, : len(row)] = ids
        attention[b, : len(row)] = 1
        targets[b, scored_from[b] : len(row) - 1] = ids[scored_from[b] + 1 :]
    t_max = max(lengths) if lengths else 0
    z_mask = torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]
    z_rows = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths))
    z_cols = torch.cat([torch.arange(len(pre), len(pre) + n) for n in lengths]) if lengths else torch.zeros(0)
    return DecoderBatch(input_ids, attention, targets, z_mask, z_rows, z_cols.long(), reduction)


def pad_sequences(arrays, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(T_i, d) arrays -> zero-padded (B, T_max, d) tensor."""
    tensors = [torch.as_tensor(a) for a in arrays]
    t_max = max(t.shape[0] for t in tensors)
    out = torch.zeros((len(tensors), t_max, tensors[0].shape[1]), dtype=dtype)
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t.to(dtype)
    return out


class Decoder:
    """Scores targets for one loaded multimodal model, running its LLM only."""

    def __init__(self, family: ModelFamily):
        self.family = family
        self.model = family.model
        self.backbone = find_text_backbone(self.model)
        self.embed = self.model.get_input_embeddings()
        self.head: nn.Module = self.model.get_output_embeddings()
        if self.head is None:
            raise UserError(f"model '{family.cfg.name}' has no LM head to score targets with")
        for parameter in self.model.parameters():  # gradients are only ever wanted w.r.t. z
            parameter.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.family.device

    def token_embeddings(self, token_ids: list[int]) -> torch.Tensor:
        """What the LLM receives for a text: its token embeddings (T, d), float32 on CPU."""
        with torch.no_grad():
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            return self.embed(ids).float().cpu()

    def _scored_logits(self, batch: DecoderBatch, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, V) in float32 at the N scored positions, row by row, and the scored mask."""
        device, dtype = self.device, self.family.dtype
        input_ids = batch.input_ids.to(device)
        embeds = self.embed(input_ids)
        values = z.to(device=device, dtype=dtype)[batch.z_mask.to(device)]
        embeds = embeds.index_put((batch.z_rows.to(device), batch.z_cols.to(device)), values)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device),
                               use_cache=False).last_hidden_state
        scored = batch.targets.to(device) != IGNORE
        return self.head(hidden[scored]).float(), scored

    def scored_log_probs(self, batch: DecoderBatch, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's next-token distributions (log, (N, V)) at the scored positions, with the row
        each belongs to (N,): rows composed alike have their positions in the same order."""
        logits, scored = self._scored_logits(batch, z)
        return torch.log_softmax(logits, dim=-1), scored.nonzero()[:, 0]

    def scores(self, batch: DecoderBatch, z: torch.Tensor) -> torch.Tensor:
        """Per-sample log-score (B,), differentiable w.r.t. z (B, T_max, d), in float32."""
        device = self.device
        logits, scored = self._scored_logits(batch, z)
        targets = batch.targets.to(device)
        token_logp = -nn.functional.cross_entropy(logits, targets[scored], reduction="none")
        rows = scored.nonzero()[:, 0]
        per_sample = torch.zeros(z.shape[0], dtype=torch.float32, device=device).index_add(0, rows, token_logp)
        if batch.reduction == "mean":
            per_sample = per_sample / scored.sum(dim=1).clamp(min=1)
        return per_sample

    def answer_loss(self, batch: DecoderBatch, z: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Causal-LM training loss: mean cross-entropy over every scored token of the batch, with the
        token count and how many of them the argmax got right (token accuracy)."""
        logits, scored = self._scored_logits(batch, z)
        targets = batch.targets.to(self.device)[scored]
        loss = nn.functional.cross_entropy(logits, targets)
        return loss, int(targets.numel()), int((logits.argmax(dim=-1) == targets).sum())

    @torch.no_grad()
    def greedy(self, z: list[torch.Tensor], parts: tuple[list[int], list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of the prompt `parts` with each z at the placeholder, batched.

        Rows are right-padded; each row's new tokens continue from its own length (position ids and
        the attention mask skip the padding), and a row stops at end-of-turn (EOS, not returned)."""
        device, dtype = self.device, self.family.dtype
        pre, post = parts
        lengths = [int(t.shape[0]) for t in z]
        rows = [pre + [self.family.placeholder_id] * n + post for n in lengths]
        width, count = max(len(r) for r in rows), len(rows)
        ids = torch.full((count, width), self.family.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((count, width), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, device=device)
            mask[b, : len(row)] = 1
        embeds = self.embed(ids)
        for b, sequence in enumerate(z):
            embeds[b, len(pre) : len(pre) + lengths[b]] = sequence.to(device=device, dtype=dtype)
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        ends = torch.tensor([len(r) for r in rows], device=device)
        hidden = out.last_hidden_state[torch.arange(count, device=device), ends - 1]
        eos = self.family.tokenizer.eos_token_id
        generated: list[list[int]] = [[] for _ in rows]
        done = torch.zeros(count, dtype=torch.bool, device=device)
        cache = out.cache
        for step in range(max_new_tokens):
            token = self.head(hidden).float().argmax(dim=-1)
            for b in (~done).nonzero()[:, 0].tolist():
                if eos is not None and int(token[b]) == eos:
                    done[b] = True
                else:
                    generated[b].append(int(token[b]))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((count, 1), dtype=torch.long, device=device)], dim=1)
            out = self.backbone(inputs_embeds=self.embed(token[:, None]), attention_mask=mask,
                                position_ids=(ends + step)[:, None], cache=cache, use_cache=True)
            cache = out.cache
            hidden = out.last_hidden_state[:, -1]
        return generated

    def answer_scores(self, z: torch.Tensor, answers: list[list[int]],
                      parts: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
        """log q(y_a | z, c) summed over tokens, for many answers y_a that share one z (A,).

        The prompt with z runs once; its key/value cache then serves every answer, so scoring m
        targets costs one prompt pass plus m short answer passes (the GMI's all-pairs layout)."""
        device, dtype = self.device, self.family.dtype
        pre, post = parts or self.family.prompt_token_parts()
        length = int(z.shape[0])
        prompt = torch.tensor([pre + [self.family.placeholder_id] * length + post], device=device)
        embeds = self.embed(prompt)
        embeds[0, len(pre) : len(pre) + length] = z.to(device=device, dtype=dtype)
        out = self.backbone(inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), use_cache=True)
        first = torch.log_softmax(self.head(out.last_hidden_state[0, -1]).float(), dim=-1)
        width = max(len(a) for a in answers)
        ids = torch.full((len(answers), width), self.family.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(answers), width), dtype=torch.long, device=device)
        for a, answer in enumerate(answers):
            ids[a, : len(answer)] = torch.tensor(answer, device=device)
            mask[a, : len(answer)] = 1
        scores = first[ids[:, 0]]
        if width > 1:
            cache = out.cache
            cache.batch_repeat_interleave(len(answers))
            context = torch.ones((len(answers), prompt.shape[1]), dtype=torch.long, device=device)
            positions = (prompt.shape[1] + torch.arange(width, device=device))[None].expand(len(answers), -1)
            hidden = self.backbone(inputs_embeds=self.embed(ids), attention_mask=torch.cat([context, mask], dim=1),
                                   position_ids=positions, cache=cache, use_cache=True).last_hidden_state
            valid = mask[:, 1:].bool()
            logits = self.head(hidden[:, :-1][valid]).float()
            token_logp = -nn.functional.cross_entropy(logits, ids[:, 1:][valid], reduction="none")
            scores = scores.index_add(0, valid.nonzero()[:, 0], token_logp)
        return scores
