"""Cases of class ``dtypes``: float16, bfloat16 and float64 models, channels_last models and inputs,
integer inputs (embedding indices, channel indices), a model built under ``torch.inference_mode()``."""

from __future__ import annotations

import torch
from torch import nn

from tests.support.adversarial.builders import (AddCase, ConvBN, case_generator, conv_bn, images, resnet18_case,
                                                    seeded_case)
from tests.support.adversarial.records import Size


class _ImageAndIndex(ConvBN):
    """An image and an integer index input (embedding added per sample), and an index_select."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)

    def forward(self, x, idx):
        y = self.bn(self.conv(x))
        return y + self.embed(idx)[:, :, None, None]


def _image_and_index(batch: int, size: Size) -> tuple:
    (x,) = images(3, 7)(batch, size)
    idx = torch.randint(0, 10, (batch,), generator=case_generator(8, batch, size))
    return x, idx


class _ChannelPicker(ConvBN):
    """An integer tensor input that indexes channels (gather along dim 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x, channels):
        y = self.bn(self.conv(x))
        return self.conv2(torch.index_select(y, 1, channels))


def _picker_inputs(batch: int, size: Size) -> tuple:
    (x,) = images(3, 9)(batch, size)
    return x, torch.tensor([7, 0, 3, 3])


def _inference_mode_build() -> nn.Module:
    with torch.inference_mode():
        return seeded_case(40, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8)))()


def dtype_cases(add: AddCase) -> None:
    """The ``dtypes`` cases, in catalog order."""
    chain = lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8), nn.Conv2d(8, 4, 1))  # noqa: E731
    add("float16_conv_bn", "dtypes", seeded_case(400, chain, dtype=torch.float16), images(3, 400, dtype=torch.float16))
    add("bfloat16_conv_bn", "dtypes", seeded_case(401, chain, dtype=torch.bfloat16), images(3, 401, dtype=torch.bfloat16))
    add("float64_conv_bn", "dtypes", seeded_case(402, chain, dtype=torch.float64), images(3, 402, dtype=torch.float64))
    add("channels_last_conv_bn", "dtypes", seeded_case(403, chain, channels_last=True), images(3, 403, channels_last=True),
        check_format=True, description="channels_last model and input; output memory format must match")
    add("channels_last_resnet18", "dtypes", resnet18_case(404, channels_last=True), images(3, 404, channels_last=True),
        sizes=(32, 40), example=(2, 32), description="torchvision resnet18, channels_last")
    add("integer_index_input", "dtypes", seeded_case(405, _ImageAndIndex), _image_and_index,
        description="an image and a LongTensor of embedding indices")
    add("integer_channel_picker", "dtypes", seeded_case(406, _ChannelPicker), _picker_inputs,
        description="an integer tensor input that index_selects channels after a BN")
    add("built_under_inference_mode", "dtypes", _inference_mode_build,
        description="model built under torch.inference_mode()")
    add("bfloat16_channels_last", "dtypes", seeded_case(407, chain, dtype=torch.bfloat16, channels_last=True),
        images(3, 407, dtype=torch.bfloat16, channels_last=True), check_format=True)
