"""Pipelines: label maps (+ images) → images, with the denoising loop written out."""

from diffaug.pipelines.semantic_synthesis import SemanticSynthesisOutput, SemanticSynthesisPipeline, StepCallback

__all__ = ["SemanticSynthesisOutput", "SemanticSynthesisPipeline", "StepCallback"]
