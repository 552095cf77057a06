"""`pulumi up` entry point: read the stack's configuration, build one r1nest Deployment, and
export what `r1nest overview --from pulumi` and `r1nest status` read.

The program lives in `r1nest_aws/`: `config.py` (typed configuration), `deployment.py` (the
`r1nest:aws:Deployment` component), `program.py` (this glue), `policies.py` (the properties the
tests hold every deployment to).
"""

from r1nest_aws.program import run

run()
