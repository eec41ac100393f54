"""Weight shapes of well-known models, built in code (no torchvision needed)."""
from __future__ import annotations


def resnet50_weight_shapes(width_div: int = 1, num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The 54 conv/linear weights of ResNet-50 (25.5 M values at width_div=1)."""

    def c(x):
        return max(1, x // width_div)

    shapes = [(c(64), 3, 7, 7)]
    inplanes = c(64)
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        p = c(planes)
        for b in range(blocks):
            shapes += [(p, inplanes, 1, 1), (p, p, 3, 3), (p * 4, p, 1, 1)]
            if b == 0:
                shapes.append((p * 4, inplanes, 1, 1))  # downsample shortcut
            inplanes = p * 4
    shapes.append((num_classes, inplanes))
    return shapes
