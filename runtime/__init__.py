"""llmtrain.runtime: what runs inside Ray — data, model, train, validate, checkpoint, export."""
