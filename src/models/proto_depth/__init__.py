from src.models.proto_depth.module import ProtoDepthModule

__all__ = ["ProtoDepthModule"]
