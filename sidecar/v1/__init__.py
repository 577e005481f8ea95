"""Generated code of the wire contract protos/sidecar/v1/sidecar.proto (do not edit)."""
