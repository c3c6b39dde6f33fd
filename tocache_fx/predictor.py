"""TokenCache's Cache Predictor: `g(l, t) -> w`, one importance weight per image token,
from the block index `l` and the denoising progress `t` only (docs/methods.md §4).

Because `w` does not depend on the input, the tokens a block prunes at a step are a
constant table, computed once per generation length (`importance`). A predictor is
saved as `predictor.safetensors` + `config.json` (what it was trained for: the model
class, its blocks, its image token count, the training record).

Example:
    >>> predictor = CachePredictor(num_blocks=6, num_tokens=256)
    >>> predictor.importance(50).shape
    torch.Size([6, 50, 256])
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CachePredictor", "progress"]

_FREQUENCIES = 8


def progress(step: int | torch.Tensor, num_steps: int) -> torch.Tensor:
    """The predictor's time input: 0 at the first denoising step, 1 at the last."""
    return torch.as_tensor(step, dtype=torch.float32) / max(1, num_steps - 1)


class CachePredictor(nn.Module):
    """Token importance per (block, step): `sigmoid(head(E[l] + T(t)))` in (0, 1)^N.

    Args:
        num_blocks: the model's blocks, in call order.
        num_tokens: its image tokens (the `hidden_states` stream of the blocks).
        hidden: width of the embeddings.
        target: the initial mean weight (the head's bias starts at its logit).
        info: what the predictor was trained for (model class, blocks, training record).
    """

    def __init__(self, num_blocks: int, num_tokens: int, hidden: int = 64, target: float = 0.5,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.num_blocks, self.num_tokens, self.hidden = num_blocks, num_tokens, hidden
        self.info = dict(info or {})
        self.blocks = nn.Embedding(num_blocks, hidden)
        self.time = nn.Sequential(nn.Linear(2 * _FREQUENCIES, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, num_tokens))
        with torch.no_grad():
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.fill_(math.log(target / (1 - target)))

    def __repr__(self) -> str:
        source = getattr(self, "source", None)
        trained = self.info.get("model", "a model")
        return (f"CachePredictor({source!r})" if source else
                f"CachePredictor(<{trained}: {self.num_blocks} blocks, {self.num_tokens} tokens>)")

    def forward(self, blocks: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Weights `[M, N]` for block indices `[M]` at progress `[M]` (see `progress`)."""
        frequencies = 2 ** torch.arange(_FREQUENCIES, device=times.device) * math.pi
        angles = times[:, None].float() * frequencies
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return torch.sigmoid(self.head(self.blocks(blocks) + self.time(features)))

    @torch.no_grad()
    def importance(self, num_steps: int) -> torch.Tensor:
        """`w` of every block at every step of a `num_steps` generation: `[L, T, N]`."""
        blocks = torch.arange(self.num_blocks).repeat_interleave(num_steps)
        times = progress(torch.arange(num_steps).repeat(self.num_blocks), num_steps)
        return self(blocks, times).view(self.num_blocks, num_steps, self.num_tokens)

    # -- saving -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "num_tokens": self.num_tokens,
                "hidden": self.hidden, "info": self.info}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `predictor.safetensors` and `config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(directory / "predictor.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CachePredictor:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        predictor = cls(config["num_blocks"], config["num_tokens"], config["hidden"],
                        info=config.get("info"))
        predictor.load_state_dict(load_file(str(directory / "predictor.safetensors")))
        predictor.source = str(directory)
        return predictor.eval()

    def check(self, model_name: str, num_blocks: int, num_tokens: int) -> None:
        """Raise if this predictor was trained for another model, depth or token count."""
        trained = self.info.get("model")
        problems = []
        if trained and trained != model_name:
            problems.append(f"it was trained for {trained}, not {model_name}")
        if num_blocks != self.num_blocks:
            problems.append(f"it has {self.num_blocks} blocks, the model {num_blocks}")
        if num_tokens != self.num_tokens:
            problems.append(f"it weighs {self.num_tokens} image tokens, the model has "
                            f"{num_tokens} (another resolution?)")
        if problems:
            raise ValueError("this Cache Predictor does not fit the model: " + "; ".join(problems)
                             + ". Train one for it with tocache_fx.train_token_cache")
