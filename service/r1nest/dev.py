"""`r1nest dev`: developer tools. `r1nest dev tiny-model` writes a tiny random-weight checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from r1nest.errors import ConfigError


@click.group()
def dev() -> None:
    """Developer tools (tiny test models)."""


@dev.command("tiny-model")
@click.option("--arch", type=click.Choice(["deepseek_v3", "qwen2"]), default="deepseek_v3", show_default=True,
              help="deepseek_v3: MLA + MoE like R1; qwen2: the distills' architecture.")
@click.option("--fp8", is_flag=True, help="DeepSeek's FP8 layout (float8 weights + 128x128 block scales); GPU only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the weights.")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def tiny_model(arch: str, fp8: bool, seed: int, out_dir: Path) -> None:
    """Write a tiny random-weight checkpoint + R1 tokenizer into OUT_DIR (no download)."""
    from r1nest import tinymodel

    if fp8 and arch != "deepseek_v3":
        raise ConfigError("--fp8 is DeepSeek's FP8 checkpoint layout: use it with --arch deepseek_v3")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")

    def progress(message: str) -> None:
        click.echo(f"  {message}", err=True)

    tinymodel.write_tiny_model(out_dir, arch=arch, fp8=fp8, seed=seed, progress=progress)  # type: ignore[arg-type]
    click.echo(str(out_dir))
