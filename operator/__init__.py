"""llmtrain.operator: the Kopf operator (imported as llmtrain.operator; needs no torch)."""
