"""Parameter counts per SE network x SE variant, as a markdown table.

Run ``python -m scse_monai.networks.params [--features 64] [--spatial-dims 2]`` to print it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from scse_monai.blocks import SE_LAYER_NAMES
from scse_monai.networks.registry import NETWORKS, get_network

__all__ = ["count_parameters", "format_parameter_table", "parameter_table"]


def count_parameters(model) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_table(
    networks: Sequence[str] = tuple(NETWORKS),
    se_variants: Sequence[str] = SE_LAYER_NAMES,
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 2,
    features: int = 64,
    **kwargs,
) -> list[dict]:
    """Counts the parameters of every network x SE variant.

    Args:
        networks: registry names (see :func:`scse_monai.networks.get_network`).
        se_variants: SE variants; ``"none"`` is the baseline the increases are relative to.
        spatial_dims: spatial dimensions of the networks.
        in_channels: input channels.
        out_channels: output channels.
        features: channels of every stage.
        kwargs: further network options (``reduction_ratio``, ``aggregation``, ``kernel_size``, ...).

    Returns:
        One dict per (network, se) with keys ``network``, ``se``, ``parameters``, ``added`` and ``added_percent``
        (relative to ``se="none"`` of the same network).

    Example::

        >>> rows = parameter_table(networks=["unet"], features=64)
        >>> [r["added"] for r in rows]
        [0, 33536, 520, 34056]
    """
    options = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, features=features)
    rows = []
    for name in networks:
        base = count_parameters(get_network(name, se=None, **options, **kwargs))
        for se in se_variants:
            n = count_parameters(get_network(name, se=se, **options, **kwargs))
            rows.append(
                {
                    "network": name,
                    "se": se,
                    "parameters": n,
                    "added": n - base,
                    "added_percent": 100.0 * (n - base) / base,
                }
            )
    return rows


def format_parameter_table(rows: Sequence[dict]) -> str:
    """Formats :func:`parameter_table` rows as a markdown table."""
    lines = ["| network | SE | parameters | added | added % |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['se']} | {r['parameters']:,} | {r['added']:,} | {r['added_percent']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--spatial-dims", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--out-channels", type=int, default=2)
    args = parser.parse_args(argv)
    rows = parameter_table(spatial_dims=args.spatial_dims, features=args.features, out_channels=args.out_channels)
    print(format_parameter_table(rows))


if __name__ == "__main__":
    main()
