"""Model optimization: magnitude pruning, int8 quantization and fine-tuning within an accuracy budget.

``service.Optimizer`` is the entry point (bounded worker, cancellation, versions); ``pipeline.run`` does the work.
"""
