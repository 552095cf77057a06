"""r1nest: DeepSeek-R1 as your own metered, OpenAI-compatible API."""

__version__ = "0.1.0"
