"""Plain convolutional bodies: the digits CNN, the paper's 4convNet and a CIFAR MobileNet (v1).

Batch norm keeps no running statistics (as in the paper's code): batch statistics are used at
test time too, and there are no buffers for the server to average.
"""

from __future__ import annotations

from torch import nn


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _bn(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))


class FourConvNet(nn.Sequential):
    """4 x [conv 3x3 (64) -> BN -> ReLU -> max-pool 2] -> flatten; 256 features on 32x32 inputs."""

    def __init__(self, channels: int, image_size: int) -> None:
        blocks = [_conv_block(channels if i == 0 else 64, 64) for i in range(4)]
        super().__init__(*blocks, nn.Flatten())
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"4convnet needs images of at least 16x16, got {image_size}x{image_size}")
        self.out_features = 64 * side * side


class DigitCNN(nn.Sequential):
    """A small CNN for 8x8 digits: 2 x [conv 3x3 -> BN -> ReLU -> max-pool 2] -> flatten (256 features)."""

    def __init__(self, channels: int, image_size: int) -> None:
        super().__init__(_conv_block(channels, 32), _conv_block(32, 64), nn.Flatten())
        side = image_size // 4
        if side < 1:
            raise ValueError(f"digitcnn needs images of at least 4x4, got {image_size}x{image_size}")
        self.out_features = 64 * side * side


class _DepthwiseSeparable(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), _bn(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False), _bn(cout), nn.ReLU(inplace=True),
        )


class MobileNet(nn.Sequential):
    """MobileNet v1 for small images (stride-1 stem), 1024 features after global average pooling."""

    PLAN = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

    def __init__(self, channels: int) -> None:
        layers: list[nn.Module] = [nn.Conv2d(channels, 32, 3, padding=1, bias=False), _bn(32), nn.ReLU(inplace=True)]
        cin = 32
        for step in self.PLAN:
            cout, stride = step if isinstance(step, tuple) else (step, 1)
            layers.append(_DepthwiseSeparable(cin, cout, stride))
            cin = cout
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = 1024
