"""Training with FusedConvTranspose2d follows its PyTorch twin (nn.ConvTranspose2d + the composite epilogue)
step by step: same initial weights, same data, same optimizer, loss curves equal to float32 accuracy."""
import pytest
import torch
from torch import nn

from fused_convt import FusedConvTranspose2d
from reference import composite, rel_err

STEPS = 50


class CompositeConvTranspose2d(nn.ConvTranspose2d):
    """The PyTorch twin of FusedConvTranspose2d: the same parameters, the epilogue as separate ops."""

    def __init__(self, *args, add_value=0.0, multiply_value=1.0, recompute=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_value, self.multiply_value = add_value, multiply_value

    def forward(self, input):
        return composite(input, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups,
                         self.dilation, add_value=self.add_value, multiply_value=self.multiply_value)


class UpsamplingNet(nn.Module):
    """Two epilogue layers (the second grouped and recomputing in backward), a plain conv between them and a
    1x1 conv head, so the output is not confined to the epilogue's one-signed range."""

    def __init__(self, layer):
        super().__init__()
        self.up1 = layer(4, 8, 3, stride=2, padding=1, output_padding=1, add_value=-0.3, multiply_value=2.0)
        self.mix = nn.Conv2d(8, 6, 3, padding=1)
        self.up2 = layer(6, 6, (2, 3), stride=2, padding=(0, 1), groups=3, add_value=-0.2, multiply_value=-1.5,
                         recompute=True)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.up2(self.mix(self.up1(x))))


def make_twins(device):
    torch.manual_seed(0)
    fused = UpsamplingNet(FusedConvTranspose2d).to(device)
    twin = UpsamplingNet(CompositeConvTranspose2d).to(device)
    twin.load_state_dict(fused.state_dict())
    return fused, twin


def train(model, optimizer, data, target):
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = (model(data) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_training_follows_pytorch_twin(device, optimizer_name):
    fused, twin = make_twins(device)
    assert fused.up2.recompute and not fused.up1.recompute
    # A teacher of the same architecture makes a target the student can actually fit.
    torch.manual_seed(7)
    teacher = UpsamplingNet(CompositeConvTranspose2d).to(device)
    data = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        target = teacher(data)

    def optimizer_for(model):
        if optimizer_name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=3e-3)

    fused_losses = train(fused, optimizer_for(fused), data, target)
    twin_losses = train(twin, optimizer_for(twin), data, target)

    for step, (ours, expected) in enumerate(zip(fused_losses, twin_losses)):
        assert abs(ours - expected) <= 1e-4 * abs(expected), (step, ours, expected)
    assert twin_losses[-1] < 0.1 * twin_losses[0]  # the run actually trains
    twin_parameters = dict(twin.named_parameters())
    for name, parameter in fused.named_parameters():
        assert rel_err(parameter, twin_parameters[name]) <= 1e-4, name
