"""MLP-Mixer (Tolstikhin et al. 2021) for 28x28 digits: no convolution, no attention, only MLPs.

The image is cut into non-overlapping `patch` x `patch` patches (4x4 -> a 7x7 grid of 49 tokens); a Linear
layer embeds each flattened patch into `dim` channels. Each block then mixes information twice, each time
through a pre-LayerNorm residual MLP:
  token mixing   - one MLP shared by all channels, applied across the 49 tokens (where things are),
  channel mixing - one MLP shared by all tokens, applied across the `dim` channels (what is there).
A final LayerNorm, the mean over tokens and a Linear layer give the logits.

Token mixing is a fully learned (not translation-equivariant) spatial operator, so the Mixer has far less
built-in prior than a ConvNet; the random affine augmentation of the training loop supplies the invariance
that the architecture lacks and is what brings it below 1% test error in a CPU budget.
"""

import torch
import torch.nn as nn

from models.registry import register_model


def mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = mlp(tokens, token_hidden)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = mlp(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, tokens, dim) -> (B, tokens, dim)."""
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class Mixer(nn.Module):
    def __init__(self, patch: int = 4, dim: int = 128, depth: int = 6, token_hidden: int = 64,
                 channel_hidden: int = 256):
        super().__init__()
        if 28 % patch:
            raise ValueError(f"patch={patch}: must divide 28 (2, 4, 7 or 14)")
        self.patch = patch
        tokens = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) -> (B, tokens, patch*patch): row-major grid of flattened patches (a pure reshape)."""
        b, p, g = x.shape[0], self.patch, 28 // self.patch
        return x.reshape(b, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(b, g * g, p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(self.patches((x - 0.1307) / 0.3081)))
        return self.head(self.norm(h).mean(dim=1))


@register_model("mixer", "MLP-Mixer on 4x4 patches: token- and channel-mixing MLPs, no conv/attention",
                epochs=10, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                schedule="onecycle", label_smoothing=0.1, augment=True)
def build_mixer(patch: int = 4, dim: int = 128, depth: int = 6, token_hidden: int = 64,
                channel_hidden: int = 256) -> nn.Module:
    return Mixer(patch, dim, depth, token_hidden, channel_hidden)
