"""metering: billing and usage metering for LLM calls made by chat extensions."""

__version__ = "0.1.0"
