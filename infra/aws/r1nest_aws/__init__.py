"""r1nest on AWS: the Pulumi program's modules (see infra/aws/__main__.py)."""
