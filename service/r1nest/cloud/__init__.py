"""r1nest on AWS, the parts that are not the Pulumi program itself.

    userdata.py    the cloud-init document each instance boots with (pure rendering, no secret)
    bootstrap.py   registers the Pulumi-generated ApiKey with the ledger at boot
    status.py      `r1nest status`: instance state, endpoint health, GPU quota (boto3)
"""
