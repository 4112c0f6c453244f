"""The ctx.llm surface: metered client, resolution cascade, provider adapters, usage normalisation."""
