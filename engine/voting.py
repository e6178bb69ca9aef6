"""10-crop voting and top-k counting.

The paper (§4.1) predicts at test time "by extracting five 224×224 patches (the four corner
patches and the center patch) as well as their horizontal reflections (hence ten patches in
all), and averaging the predictions made by the network's softmax layer on the ten patches".
So we average probabilities, not logits: a view that is confidently wrong counts at most 1/10
of the vote, whereas in logit space one large logit can outvote nine mild ones.
"""
from __future__ import annotations

import torch


def vote(view_logits: torch.Tensor) -> torch.Tensor:
    """(B, V, C) logits of V views per image -> (B, C) mean softmax probability over the views."""
    if view_logits.ndim != 3:
        raise ValueError(f"vote expects (batch, views, classes) logits, got shape {tuple(view_logits.shape)}")
    return torch.softmax(view_logits.float(), dim=-1).mean(dim=1)


def topk_counts(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have their label among the k highest scores, for each k: an int64 tensor
    on the scores' device (reading it back is the caller's choice: it waits for the device).

    k is clipped at the number of classes (with 4 classes every label is in the 'top 5').
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices                   # (B, kmax)
    hits = top.eq(labels.view(-1, 1))                         # (B, kmax) bool
    return torch.stack([hits[:, :min(k, kmax)].any(dim=1).sum() for k in ks])
