"""The `r1nest` command line.

Each subcommand lives beside the code it drives and is imported only when it runs, so
`r1nest --help` is instant and the gateway never pays for Pulumi, Modal or boto3 imports.
"""

from __future__ import annotations

import importlib
import sys

import click

from r1nest import __version__

# command name -> ("module", "attribute", one-line help shown by `r1nest --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("r1nest.serve", "serve", "Run engine + gateway + ledger on this machine."),
    "gateway": ("r1nest.gateway.cli", "gateway", "Run the gateway in front of a running engine."),
    "keys": ("r1nest.keys_cli", "keys", "Create, list, revoke and top up API keys."),
    "ledger": ("r1nest.ledger.cli", "ledger", "The credit ledger: apply schema migrations."),
    "usage": ("r1nest.usage_cli", "usage", "Requests, tokens and credits per hour or day."),
    "plan": ("r1nest.planner_cli", "plan", "Pick hardware and the engine launch for a model."),
    "overview": ("r1nest.overview.cli", "overview", "Render a deployment's overview page."),
    "status": ("r1nest.cloud.status", "status", "State, health and GPU quota of an AWS deployment."),
    "doctor": ("r1nest.doctor", "doctor", "Preflight this box: GPUs, FP8, kernels, disk, plan."),
    "bench": ("r1nest.bench", "bench", "Load-test a deployment: TTFT, ITL, tokens/s, credits."),
    "dev": ("r1nest.dev", "dev", "Developer tools (tiny test models)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attribute, _ = entry
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="r1nest")
def cli() -> None:
    """r1nest: DeepSeek-R1 as your own metered, OpenAI-compatible API.

    \b
    Quick start on this machine:
      r1nest serve --model deepseek-r1-distill-qwen-7b
    """


def main() -> None:
    from r1nest.errors import R1nestError

    try:
        cli(standalone_mode=True)
    except R1nestError as exc:  # a clear message, never a stack trace
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
