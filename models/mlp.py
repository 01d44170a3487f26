"""The classic 784-100-10 perceptron of Tariq Rashid's "Make Your Own Neural Network".

One hidden layer of 100 sigmoid units, inputs rescaled to 0.01..1.0 as in the book, plain SGD on small
batches. It is the weak baseline (about 2-3% test error) whose mistakes are easy to find and to fix.
"""

import torch
import torch.nn as nn

from models.registry import register_model


class Perceptron(nn.Module):
    def __init__(self, hidden: int = 100):
        super().__init__()
        self.hidden = nn.Linear(28 * 28, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1) * 0.99 + 0.01  # the book's input scaling: never exactly zero
        return self.out(torch.sigmoid(self.hidden(x)))


@register_model("mlp", "784-100-10 sigmoid perceptron (Make Your Own Neural Network)",
                epochs=10, batch_size=16, optimizer="sgd", lr=0.2, momentum=0.0, weight_decay=0.0,
                schedule="constant")
def build_mlp(hidden: int = 100) -> nn.Module:
    if hidden < 1:
        raise ValueError(f"hidden={hidden}: the hidden layer needs 1 or more units")
    return Perceptron(hidden)
