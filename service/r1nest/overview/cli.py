"""`r1nest overview`: render a deployment's overview page to a file (and open it).

    r1nest overview                              # the local `r1nest serve` (data dir)
    r1nest overview --from pulumi                # infra/aws's current stack (pulumi CLI)
    r1nest overview --stack-json outputs.json    # saved `pulumi stack output --json --show-secrets`
    r1nest overview --from modal --modal-app r1nest

The file holds the API key, so it is written with mode 0600. Its CSS and JS are inlined: it
works offline and from file://, with no CDN.
"""

from __future__ import annotations

import webbrowser
from pathlib import Path

import click

from r1nest.errors import ConfigError
from r1nest.files import modal_key_file, read_key_file, write_private_text
from r1nest.overview import sources
from r1nest.overview.context import OverviewContext
from r1nest.overview.render import render_overview
from r1nest.paths import REPO_ROOT

DEFAULT_STACK_DIR = REPO_ROOT / "infra" / "aws"
DEFAULT_MODAL_FUNCTION = "serve"


def write_page(ctx: OverviewContext, path: Path) -> Path:
    """The standalone page, written with owner-only permissions (it holds the key)."""
    return write_private_text(path, render_overview(ctx, standalone=True))


def build_context(
    *,
    source: str,
    data_dir: Path | None,
    stack_dir: Path,
    stack: str | None,
    stack_json: Path | None,
    modal_app: str,
    modal_function: str,
    modal_environment: str | None,
    key_file: Path | None,
    model: str | None,
) -> tuple[OverviewContext, Path]:
    """(context, data dir) for the chosen source, without live values."""
    from r1nest.settings import load_settings

    settings = load_settings(data_dir=data_dir)
    if source == "local":
        ctx = sources.from_local(settings)
        if key_file is not None:
            from dataclasses import replace

            ctx = replace(ctx, api_key=read_key_file(key_file))
    elif source == "pulumi":
        if stack_json is not None:
            outputs = sources.load_outputs_file(stack_json)
            ctx = sources.from_pulumi_outputs(outputs, source=f"the stack outputs in {stack_json}")
        else:
            outputs = sources.pulumi_stack_outputs(stack_dir, stack=stack)
            name = f"stack {stack}" if stack else "the current stack"
            ctx = sources.from_pulumi_outputs(outputs, source=f"the Pulumi {name} in {stack_dir}")
    elif source == "modal":
        ctx = sources.from_modal(
            app_name=modal_app,
            function_name=modal_function,
            environment=modal_environment,
            model=model or settings.served_model or settings.model,
            engine=settings.engine,
            key_file=key_file or modal_key_file(settings.data_dir, modal_app),
        )
    else:  # click's Choice keeps this unreachable
        raise ConfigError(f"unknown source {source!r}")
    return ctx, Path(settings.data_dir).expanduser()


@click.command("overview")
@click.option("--from", "source", type=click.Choice(["local", "pulumi", "modal"]), default=None,
              help="Which deployment (default: pulumi with --stack-json, modal with --modal-app, else local).")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Local data dir (default: R1NEST_DATA_DIR or ~/.r1nest).")
@click.option("--stack-dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_STACK_DIR,
              show_default=True, help="The Pulumi project directory.")
@click.option("--stack", default=None, help="Pulumi stack name (default: the selected stack).")
@click.option("--stack-json", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Saved output of `pulumi stack output --json --show-secrets`.")
@click.option("--modal-app", default=None, help="Deployed Modal app name.")
@click.option("--modal-function", default=DEFAULT_MODAL_FUNCTION, show_default=True,
              help="The app's web function.")
@click.option("--modal-environment", default=None, help="Modal environment (default: the profile's).")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file holding the ApiKey to show (default: the deployment's own).")
@click.option("--model", default=None, help="Served model name (Modal; default: the settings' model).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the page (default: <data dir>/overview.html).")
@click.option("--open", "open_page", is_flag=True, help="Open the page in a browser.")
@click.option("--no-probe", is_flag=True, help="Do not ask the deployment for readiness and credits.")
def overview(
    source: str | None, data_dir: Path | None, stack_dir: Path, stack: str | None, stack_json: Path | None,
    modal_app: str | None, modal_function: str, modal_environment: str | None, key_file: Path | None,
    model: str | None, out: Path | None, open_page: bool, no_probe: bool,
) -> None:
    """Render a deployment's overview page: endpoints, ApiKey, credits and working examples."""
    if source is None:
        source = "pulumi" if stack_json is not None else "modal" if modal_app else "local"
    ctx, local_dir = build_context(
        source=source, data_dir=data_dir, stack_dir=stack_dir, stack=stack, stack_json=stack_json,
        modal_app=modal_app or "r1nest", modal_function=modal_function, modal_environment=modal_environment,
        key_file=key_file, model=model,
    )
    if not no_probe:
        ctx = sources.with_live(ctx, sources.probe(ctx))
    path = write_page(ctx, out or local_dir / "overview.html")
    click.echo(f"overview of {ctx.model} at {ctx.public_endpoint}: {ctx.readiness.label}")
    click.echo(f"wrote {path} (mode 0600: it contains the API key)")
    if ctx.api_key is None:
        click.echo("no API key found: the examples read $OPENAI_API_KEY (create one with `r1nest keys create`)")
    if open_page:
        webbrowser.open(path.resolve().as_uri())
