"""The KServe v2 / Triton gRPC inference protocol on the router, next to InferenceService.

tensors.py reads and writes tensor data, mapping.py translates requests and responses, and
servicer.py is the gRPC layer over the router's Dispatcher.
"""
