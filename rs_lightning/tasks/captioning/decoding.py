"""Caption decoding over open_clip's CoCa with exact log-probs: sampling, greedy, beam search, teacher forcing.

open_clip's `CoCa.generate` is not used. With the pinned transformers 5.24 it does not run at all: open_clip
3.3.0 imports `BeamSearchScorer`, which transformers 5 removed, so every generation type fails with "Please
install transformers". It would not fit anyway: it returns no log-probs (SCST needs them), its sampling always
applies a top-k/top-p warper and a minimum length, its beam search is transformers' group beam search, and it
computes the 49408-way logits of every prefix position at every step. Here one decoder step projects only the
LAST position, and the output softmax can be restricted to a vocabulary (the token ids of the training
captions, as the paper's captioner used a vocabulary of training words); the policy is then the softmax over
those ids, the same distribution for sampling, scoring and training.
Without a vocabulary the full softmax is used with SOT and pad forbidden (they are never valid outputs).

Sequences are `[N, T]` token ids (open_clip ids, not vocabulary positions) without the leading SOT, padded
with the pad id after the first EOT; `mask` is 1 up to and including EOT (the paper keeps EOT in the loss).
A caption that reaches `max_length` without EOT is kept as is (truncated, every mask entry 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rs_lightning.tasks.autocast_cache import cast_once_per_decode
from rs_lightning.tasks.captioning.incremental import IncrementalDecoder, supports_incremental


@dataclass
class Decoded:
    """Generated captions.

    Attributes:
        tokens: `[N, T]` token ids, pad after EOT.
        mask: `[N, T]` 1.0 on real tokens (EOT included), 0.0 on padding.
        logprobs: `[N, T]` log-prob of each token under the policy when it was generated, 0 on padding.
    """

    tokens: Tensor
    mask: Tensor
    logprobs: Tensor


def encode_images(model: nn.Module, images: Tensor) -> Tensor:
    """The image tokens CoCa's text decoder cross-attends to.

    Args:
        images: `[B, 3, S, S]` preprocessed images.

    Returns:
        `[B, Q, D]` attention-pooled image embeddings.
    """
    _, image_embs = model._encode_image(images)
    return image_embs


def decoder_hidden(model: nn.Module, image_embs: Tensor, tokens: Tensor) -> Tensor:
    """CoCa's multimodal decoder up to (not including) the output projection: `text_decoder` minus its matmul.

    Args:
        image_embs: `[N, Q, D]`.
        tokens: `[N, L]` input ids starting with SOT.

    Returns:
        `[N, L, W]` final-layer-normed hidden states; position t predicts token t+1.
    """
    _, token_embs = model._encode_text(tokens)
    dec = model.text_decoder
    length = token_embs.shape[1]
    if not dec.batch_first:
        raise NotImplementedError("decoder_hidden supports batch-first text decoders (open_clip's default)")
    x = token_embs
    for self_block, cross_block in zip(dec.resblocks, dec.cross_attn):
        x = self_block(x, attn_mask=dec.attn_mask[:length, :length])
        x = cross_block(x, k_x=image_embs, v_x=image_embs)
    return dec.ln_final(x)


class CaptionDecoder:
    """Decoding and scoring with one CoCa and one output vocabulary.

    Args:
        model: an open_clip CoCa.
        sot_id, eot_id, pad_id: the tokenizer's special ids.
        vocab: `[V']` allowed output token ids (must hold `eot_id`), or None for the full vocabulary.
        incremental: decode with cached one-token steps (incremental.py) where the model allows; False re-runs
            the whole prefix at every step (the reference the cache is tested against).
    """

    def __init__(self, model: nn.Module, sot_id: int, eot_id: int, pad_id: int, vocab: Tensor | None = None,
                 incremental: bool = True):
        self.model = model
        self.incremental = incremental
        self.sot_id, self.eot_id, self.pad_id = sot_id, eot_id, pad_id
        proj = model.text_decoder.text_projection
        self.vocab_size = proj.shape[1]
        self.vocab = None if vocab is None else vocab.to(proj.device, torch.long)
        if self.vocab is None:
            self.index = None
            self.banned = torch.zeros(self.vocab_size, dtype=torch.bool, device=proj.device)
            self.banned[[sot_id, pad_id]] = True
        else:
            if not bool((self.vocab == eot_id).any()):
                raise ValueError("the output vocabulary must contain the EOT id")
            # token id -> position in the vocabulary (-1: not an output token)
            self.index = torch.full((self.vocab_size,), -1, dtype=torch.long, device=proj.device)
            self.index[self.vocab] = torch.arange(len(self.vocab), device=proj.device)
        self.eot_index = self.eot_id if self.vocab is None else int(self.index[eot_id])

    # -- logits over the output vocabulary -----------------------------------------------------------------

    def project(self, hidden: Tensor) -> Tensor:
        """`[..., W]` hidden states -> `[..., V']` logits over the output vocabulary."""
        proj = self.model.text_decoder.text_projection
        if self.vocab is None:
            return (hidden @ proj).masked_fill(self.banned, float("-inf"))
        return hidden @ proj.index_select(1, self.vocab)

    def to_tokens(self, positions: Tensor) -> Tensor:
        """Vocabulary positions -> token ids."""
        return positions if self.vocab is None else self.vocab[positions]

    def to_positions(self, tokens: Tensor) -> Tensor:
        """Token ids -> vocabulary positions (-1 for ids outside the vocabulary)."""
        return tokens if self.index is None else self.index[tokens]

    def _inputs(self, tokens: Tensor) -> Tensor:
        sot = torch.full_like(tokens[:, :1], self.sot_id)
        return torch.cat([sot, tokens[:, :-1]], dim=1)

    # -- teacher forcing ------------------------------------------------------------------------------------

    def token_logprobs(self, image_embs: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """Log-prob of each token of given sequences (differentiable), e.g. to recompute SCST samples.

        Args:
            image_embs: `[N, Q, D]`.
            tokens: `[N, T]` token ids without SOT.
            mask: `[N, T]` real-token mask.

        Returns:
            `[N, T]` log p(token_t | image, tokens_<t), 0 where `mask` is 0.
        """
        logp = F.log_softmax(self.project(decoder_hidden(self.model, image_embs, self._inputs(tokens))), dim=-1)
        positions = self.to_positions(tokens)
        real = mask.bool()
        if bool((positions[real] < 0).any()):
            raise ValueError("a token to score is outside the output vocabulary")
        picked = logp.gather(-1, positions.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return torch.where(real, picked, torch.zeros_like(picked))

    def xe_loss(self, image_embs: Tensor, captions: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy (teacher forcing) of reference captions, mean over their real tokens.

        Args:
            image_embs: `[N, Q, D]`, one row per caption.
            captions: `[N, C]` tokenizer output (SOT, tokens, EOT, pad).

        Returns:
            0-dim loss.
        """
        length = int((captions != self.pad_id).sum(1).max())  # drop the all-pad tail of the context
        captions = captions[:, :length]
        targets = captions[:, 1:]
        real = targets != self.pad_id
        positions = self.to_positions(targets)
        if bool((positions[real] < 0).any()):
            raise ValueError("a reference token is outside the output vocabulary (build it from these captions)")
        logits = self.project(decoder_hidden(self.model, image_embs, captions[:, :-1]))
        return F.cross_entropy(logits[real], positions[real], label_smoothing=label_smoothing)

    # -- generation -----------------------------------------------------------------------------------------

    def next_logprobs(self, image_embs: Tensor, prefix: Tensor) -> Tensor:
        """`[N, V']` log-probs of the next token after `prefix` (`[N, L]`, starting with SOT): the full pass."""
        hidden = decoder_hidden(self.model, image_embs, prefix)[:, -1]
        return F.log_softmax(self.project(hidden), dim=-1)

    @staticmethod
    def _rows(image_embs: Tensor) -> tuple[int, torch.device, torch.dtype]:
        return image_embs.shape[0], image_embs.device, image_embs.dtype

    @staticmethod
    def _repeat(image_embs: Tensor, k: int) -> Tensor:
        return image_embs.repeat_interleave(k, dim=0)

    def _stepper(self, image_embs: Tensor, first: Tensor):
        """`next(token)` -> `[N, V']` next-token log-probs: cached one-token steps where the model allows them
        (incremental.py: O(T) instead of O(T^2) token passes per caption), the full pass otherwise."""
        if self.incremental and supports_incremental(self.model):
            state = IncrementalDecoder(self.model, image_embs)

            def step(token: Tensor, reorder: Tensor | None = None) -> Tensor:
                if reorder is not None:
                    state.select(reorder)
                return F.log_softmax(self.project(state.step(token)), dim=-1)

            return step
        prefix = first[:, :0]
        embs = image_embs

        def full(token: Tensor, reorder: Tensor | None = None) -> Tensor:
            nonlocal prefix, embs
            if reorder is not None:
                prefix, embs = prefix[reorder], embs[reorder]
            prefix = torch.cat([prefix, token[:, None]], dim=1)
            return self.next_logprobs(embs, prefix)

        return full

    @torch.no_grad()
    @cast_once_per_decode  # under bf16/fp16-mixed: each weight cast once per decode (tasks/autocast_cache.py)
    def generate(
        self, image_embs: Tensor, max_length: int, *, greedy: bool = False, generator: torch.Generator | None = None
    ) -> Decoded:
        """Sample (multinomial, temperature 1) or greedy-decode one caption per row of `image_embs`.

        Args:
            image_embs: `[N, Q, D]` (repeat each image k times for k samples per image).
            max_length: most tokens per caption (EOT included).
            greedy: argmax instead of sampling.
            generator: random generator for sampling (on the embeddings' device).
        """
        n, device, _ = self._rows(image_embs)
        prefix = torch.full((n, 1), self.sot_id, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        tokens, masks, logprobs = [], [], []
        step = self._stepper(image_embs, prefix)
        logp = step(prefix[:, 0])
        for i in range(max_length):
            if greedy:
                pos = logp.argmax(-1)
            else:
                pos = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            token = torch.where(done, torch.full_like(pos, self.pad_id), self.to_tokens(pos))
            lp = torch.where(done, torch.zeros_like(logp[:, 0]), logp.gather(1, pos[:, None]).squeeze(1))
            tokens.append(token)
            masks.append((~done).to(logp.dtype))
            logprobs.append(lp)
            done = done | (token == self.eot_id)
            if bool(done.all()) or i + 1 == max_length:
                break
            logp = step(token)
        return Decoded(torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logprobs, 1))

    @torch.no_grad()
    @cast_once_per_decode  # under bf16/fp16-mixed: each weight cast once per decode (tasks/autocast_cache.py)
    def beam_search(
        self, image_embs: Tensor, max_length: int, beam_size: int = 5, length_penalty: float = 1.0
    ) -> Decoded:
        """Beam search; the best beam per image by score / length**length_penalty.

        Finished beams stay in the beam with a frozen score (their only continuation is padding at cost 0), so
        pruning compares raw sums of log-probs and length normalisation applies to the final choice, as in the
        paper's captioner (length counts EOT).

        Args:
            image_embs: `[B, Q, D]`, one row per image.
            max_length: most tokens per caption.
            beam_size: beams per image (paper 5); 1 is greedy decoding.
            length_penalty: exponent of the length in the final normalisation (0: raw log-prob).

        Returns:
            The best caption of each image (`logprobs` holds its per-token log-probs).
        """
        (b, device, dtype), k = self._rows(image_embs), beam_size
        embs = self._repeat(image_embs, k)
        prefix = torch.full((b * k, 1), self.sot_id, dtype=torch.long, device=device)
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first one at step 1
        done = torch.zeros(b * k, dtype=torch.bool, device=device)
        lengths = torch.zeros(b * k, device=device)
        steps: list[Tensor] = []
        step = self._stepper(embs, prefix)
        logp = step(prefix[:, 0])
        for i in range(max_length):
            frozen = torch.full_like(logp[0], float("-inf"))
            frozen[self.eot_index] = 0.0  # a finished beam's one continuation (written as padding below)
            logp = torch.where(done[:, None], frozen, logp)
            width = logp.shape[-1]
            candidates = (scores.reshape(b * k, 1) + logp).reshape(b, k * width)
            scores, flat = candidates.topk(k, dim=1)
            source = (torch.arange(b, device=device)[:, None] * k + flat // width).reshape(-1)
            pos = (flat % width).reshape(-1)
            prefix, done, lengths = prefix[source], done[source], lengths[source]
            steps = [s[source] for s in steps]
            token = torch.where(done, torch.full_like(pos, self.pad_id), self.to_tokens(pos))
            steps.append(torch.where(done, torch.zeros_like(pos, dtype=logp.dtype), logp[source, pos]))
            lengths = lengths + (~done).to(lengths.dtype)
            done = done | (token == self.eot_id)
            prefix = torch.cat([prefix, token[:, None]], dim=1)
            if bool(done.all()) or i + 1 == max_length:
                break
            logp = step(token, reorder=source)
        final = scores / lengths.reshape(b, k).clamp_min(1.0) ** length_penalty
        best = torch.arange(b, device=device) * k + final.argmax(dim=1)
        tokens = prefix[best, 1:]
        mask = torch.ones_like(tokens, dtype=dtype)
        mask[:, 1:] = (torch.cumsum((tokens == self.eot_id).long(), 1)[:, :-1] == 0).to(mask.dtype)
        return Decoded(tokens, mask, torch.stack(steps, 1)[best])


class MixtureDecoder(CaptionDecoder):
    """Functional ensembling: N captioners decoded as ONE policy, the token-level mixture

        p(y_t | y_<t, x) = sum_i w_i p_i(y_t | y_<t, x),

    the prediction ensemble the rewarded-soups paper compares weight interpolation with (Ramé et al. 2023,
    Lemma 4 and its ensembling baselines). Each step costs one decoder step of every member with w_i > 0. The
    members share the tokenizer ids and the output vocabulary; `image_embs` is a list, one `[N, Q, D]` per member
    (each member encodes the images with its own encoder). Sampling, greedy decoding and beam search work as for
    one model, on the mixture's log-probs.

    Args:
        decoders: one CaptionDecoder per member.
        weights: the mixture weights (>= 0, summing to 1), aligned with `decoders`.
    """

    def __init__(self, decoders: list[CaptionDecoder], weights: list[float]):
        if len(decoders) != len(weights) or not decoders:
            raise ValueError(f"got {len(decoders)} decoders and {len(weights)} weights: one weight per member")
        if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1, got {list(weights)}")
        first = decoders[0]
        for d in decoders[1:]:
            same_vocab = (d.vocab is None and first.vocab is None) or (
                d.vocab is not None and first.vocab is not None and torch.equal(d.vocab, first.vocab))
            if (d.sot_id, d.eot_id, d.pad_id) != (first.sot_id, first.eot_id, first.pad_id) or not same_vocab:
                raise ValueError("the members of a mixture must share the tokenizer ids and the output vocabulary")
        self.__dict__.update({k: v for k, v in first.__dict__.items() if k != "model"})
        self.model = first.model
        self.live = [i for i, w in enumerate(weights) if w > 0]
        self.members = [decoders[i] for i in self.live]
        self.log_w = torch.log(torch.tensor([weights[i] for i in self.live], dtype=torch.float64))

    def _rows(self, image_embs):
        return image_embs[0].shape[0], image_embs[0].device, image_embs[0].dtype

    def _repeat(self, image_embs, k: int):
        return [e.repeat_interleave(k, dim=0) for e in image_embs]

    def _stepper(self, image_embs, first: Tensor):
        if len(image_embs) != len(self.live):
            raise ValueError("one image embedding per member with a positive weight")
        steps = [d._stepper(e, first) for d, e in zip(self.members, image_embs)]

        def step(token: Tensor, reorder: Tensor | None = None) -> Tensor:
            logps = torch.stack([s(token, reorder) for s in steps])  # [M, N, V']
            log_w = self.log_w.to(logps.device, logps.dtype)[:, None, None]
            return torch.logsumexp(logps + log_w, dim=0)

        return step

    def token_logprobs(self, image_embs, tokens: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError("a mixture is decoded, not trained: score tokens with each member's decoder")

    def xe_loss(self, image_embs, captions: Tensor, label_smoothing: float = 0.0) -> Tensor:
        raise NotImplementedError("a mixture is decoded, not trained: train its members")

    def next_logprobs(self, image_embs, prefix: Tensor) -> Tensor:
        logps = torch.stack([d.next_logprobs(e, prefix) for d, e in zip(self.members, image_embs)])
        return torch.logsumexp(logps + self.log_w.to(logps.device, logps.dtype)[:, None, None], dim=0)
