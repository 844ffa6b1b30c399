from gradient.v1 import graph_pb2 as _graph_pb2
from gradient.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PayloadForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_FORM_RAW: _ClassVar[PayloadForm]
    PAYLOAD_FORM_LISTS: _ClassVar[PayloadForm]

class JacobianMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JACOBIAN_MODE_AUTO: _ClassVar[JacobianMode]
    JACOBIAN_MODE_REVERSE: _ClassVar[JacobianMode]
    JACOBIAN_MODE_FORWARD: _ClassVar[JacobianMode]

class StepKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_KIND_GRADIENT: _ClassVar[StepKind]
    STEP_KIND_FORWARD: _ClassVar[StepKind]

class ChunkTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_TARGET_UNSPECIFIED: _ClassVar[ChunkTarget]
    CHUNK_TARGET_INPUT: _ClassVar[ChunkTarget]
    CHUNK_TARGET_SEED: _ClassVar[ChunkTarget]
    CHUNK_TARGET_VALUE: _ClassVar[ChunkTarget]
    CHUNK_TARGET_GRADIENT: _ClassVar[ChunkTarget]
PAYLOAD_FORM_RAW: PayloadForm
PAYLOAD_FORM_LISTS: PayloadForm
JACOBIAN_MODE_AUTO: JacobianMode
JACOBIAN_MODE_REVERSE: JacobianMode
JACOBIAN_MODE_FORWARD: JacobianMode
STEP_KIND_GRADIENT: StepKind
STEP_KIND_FORWARD: StepKind
CHUNK_TARGET_UNSPECIFIED: ChunkTarget
CHUNK_TARGET_INPUT: ChunkTarget
CHUNK_TARGET_SEED: ChunkTarget
CHUNK_TARGET_VALUE: ChunkTarget
CHUNK_TARGET_GRADIENT: ChunkTarget

class ForwardRequest(_message.Message):
    __slots__ = ("graph", "inputs", "fetch", "response_payload", "graph_digest")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    fetch: _containers.RepeatedScalarFieldContainer[str]
    response_payload: PayloadForm
    graph_digest: str
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., fetch: _Optional[_Iterable[str]] = ..., response_payload: _Optional[_Union[PayloadForm, str]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("values", "graph_digest")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    values: _containers.MessageMap[str, _tensor_pb2.Tensor]
    graph_digest: str
    def __init__(self, values: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("graph", "inputs", "output", "seed", "wrt", "fetch", "response_payload", "graph_digest", "batched_seed", "batch_axes")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BatchAxesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BATCHED_SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_AXES_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    output: str
    seed: _tensor_pb2.Tensor
    wrt: _containers.RepeatedScalarFieldContainer[str]
    fetch: _containers.RepeatedScalarFieldContainer[str]
    response_payload: PayloadForm
    graph_digest: str
    batched_seed: bool
    batch_axes: _containers.ScalarMap[str, int]
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., output: _Optional[str] = ..., seed: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., wrt: _Optional[_Iterable[str]] = ..., fetch: _Optional[_Iterable[str]] = ..., response_payload: _Optional[_Union[PayloadForm, str]] = ..., graph_digest: _Optional[str] = ..., batched_seed: _Optional[bool] = ..., batch_axes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SkippedNode(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GradientResponse(_message.Message):
    __slots__ = ("values", "gradients", "skipped", "graph_digest")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    values: _containers.MessageMap[str, _tensor_pb2.Tensor]
    gradients: _containers.MessageMap[str, _tensor_pb2.Tensor]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedNode]
    graph_digest: str
    def __init__(self, values: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., gradients: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., skipped: _Optional[_Iterable[_Union[SkippedNode, _Mapping]]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class ListOpsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpInput(_message.Message):
    __slots__ = ("name", "differentiable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    differentiable: bool
    def __init__(self, name: _Optional[str] = ..., differentiable: _Optional[bool] = ...) -> None: ...

class OpAttr(_message.Message):
    __slots__ = ("name", "type", "required", "default", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    default: _graph_pb2.AttrValue
    doc: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., default: _Optional[_Union[_graph_pb2.AttrValue, _Mapping]] = ..., doc: _Optional[str] = ...) -> None: ...

class OpInfo(_message.Message):
    __slots__ = ("name", "doc", "inputs", "variadic", "attrs", "batchable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VARIADIC_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    BATCHABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    doc: str
    inputs: _containers.RepeatedCompositeFieldContainer[OpInput]
    variadic: bool
    attrs: _containers.RepeatedCompositeFieldContainer[OpAttr]
    batchable: bool
    def __init__(self, name: _Optional[str] = ..., doc: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[OpInput, _Mapping]]] = ..., variadic: _Optional[bool] = ..., attrs: _Optional[_Iterable[_Union[OpAttr, _Mapping]]] = ..., batchable: _Optional[bool] = ...) -> None: ...

class ListOpsResponse(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[OpInfo]
    def __init__(self, ops: _Optional[_Iterable[_Union[OpInfo, _Mapping]]] = ...) -> None: ...

class CheckGradientRequest(_message.Message):
    __slots__ = ("graph", "inputs", "output", "seed", "wrt", "eps", "atol", "rtol", "max_elements", "directions", "random_seed", "graph_digest")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    MAX_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SEED_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    output: str
    seed: _tensor_pb2.Tensor
    wrt: _containers.RepeatedScalarFieldContainer[str]
    eps: float
    atol: float
    rtol: float
    max_elements: int
    directions: int
    random_seed: int
    graph_digest: str
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., output: _Optional[str] = ..., seed: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., wrt: _Optional[_Iterable[str]] = ..., eps: _Optional[float] = ..., atol: _Optional[float] = ..., rtol: _Optional[float] = ..., max_elements: _Optional[int] = ..., directions: _Optional[int] = ..., random_seed: _Optional[int] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class NodeGradientCheck(_message.Message):
    __slots__ = ("name", "max_abs_error", "max_rel_error", "passed", "checked")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_abs_error: float
    max_rel_error: float
    passed: bool
    checked: int
    def __init__(self, name: _Optional[str] = ..., max_abs_error: _Optional[float] = ..., max_rel_error: _Optional[float] = ..., passed: _Optional[bool] = ..., checked: _Optional[int] = ...) -> None: ...

class CheckGradientResponse(_message.Message):
    __slots__ = ("passed", "nodes", "skipped", "eps", "atol", "rtol", "graph_digest")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    nodes: _containers.RepeatedCompositeFieldContainer[NodeGradientCheck]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedNode]
    eps: float
    atol: float
    rtol: float
    graph_digest: str
    def __init__(self, passed: _Optional[bool] = ..., nodes: _Optional[_Iterable[_Union[NodeGradientCheck, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedNode, _Mapping]]] = ..., eps: _Optional[float] = ..., atol: _Optional[float] = ..., rtol: _Optional[float] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class GradientGraphRequest(_message.Message):
    __slots__ = ("graph", "inputs", "output", "wrt", "graph_digest")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    output: str
    wrt: _containers.RepeatedScalarFieldContainer[str]
    graph_digest: str
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., output: _Optional[str] = ..., wrt: _Optional[_Iterable[str]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class GradientGraphResponse(_message.Message):
    __slots__ = ("graph", "gradients", "seed", "skipped", "graph_digest")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    gradients: _containers.ScalarMap[str, str]
    seed: str
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedNode]
    graph_digest: str
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., gradients: _Optional[_Mapping[str, str]] = ..., seed: _Optional[str] = ..., skipped: _Optional[_Iterable[_Union[SkippedNode, _Mapping]]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class HessianVectorProductRequest(_message.Message):
    __slots__ = ("graph", "inputs", "output", "vector", "response_payload", "graph_digest")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class VectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    output: str
    vector: _containers.MessageMap[str, _tensor_pb2.Tensor]
    response_payload: PayloadForm
    graph_digest: str
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., output: _Optional[str] = ..., vector: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., response_payload: _Optional[_Union[PayloadForm, str]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class HessianVectorProductResponse(_message.Message):
    __slots__ = ("products", "graph_digest")
    class ProductsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    products: _containers.MessageMap[str, _tensor_pb2.Tensor]
    graph_digest: str
    def __init__(self, products: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class JacobianVectorProductRequest(_message.Message):
    __slots__ = ("graph", "inputs", "output", "tangents", "tangents_of", "all_tangents", "fetch", "batched_tangents", "response_payload", "graph_digest")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_OF_FIELD_NUMBER: _ClassVar[int]
    ALL_TANGENTS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    BATCHED_TANGENTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    output: str
    tangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    tangents_of: _containers.RepeatedScalarFieldContainer[str]
    all_tangents: bool
    fetch: _containers.RepeatedScalarFieldContainer[str]
    batched_tangents: bool
    response_payload: PayloadForm
    graph_digest: str
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., output: _Optional[str] = ..., tangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., tangents_of: _Optional[_Iterable[str]] = ..., all_tangents: _Optional[bool] = ..., fetch: _Optional[_Iterable[str]] = ..., batched_tangents: _Optional[bool] = ..., response_payload: _Optional[_Union[PayloadForm, str]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class JacobianVectorProductResponse(_message.Message):
    __slots__ = ("values", "tangents", "skipped", "graph_digest")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    values: _containers.MessageMap[str, _tensor_pb2.Tensor]
    tangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedNode]
    graph_digest: str
    def __init__(self, values: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., tangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., skipped: _Optional[_Iterable[_Union[SkippedNode, _Mapping]]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class JacobianRequest(_message.Message):
    __slots__ = ("graph", "inputs", "output", "wrt", "mode", "response_payload", "graph_digest")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    output: str
    wrt: _containers.RepeatedScalarFieldContainer[str]
    mode: JacobianMode
    response_payload: PayloadForm
    graph_digest: str
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., output: _Optional[str] = ..., wrt: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[JacobianMode, str]] = ..., response_payload: _Optional[_Union[PayloadForm, str]] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class JacobianResponse(_message.Message):
    __slots__ = ("jacobians", "mode", "products", "graph_digest")
    class JacobiansEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    JACOBIANS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    jacobians: _containers.MessageMap[str, _tensor_pb2.Tensor]
    mode: JacobianMode
    products: int
    graph_digest: str
    def __init__(self, jacobians: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., mode: _Optional[_Union[JacobianMode, str]] = ..., products: _Optional[int] = ..., graph_digest: _Optional[str] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("start", "steps", "chunks")
    START_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    start: SessionStart
    steps: _containers.RepeatedCompositeFieldContainer[SessionStep]
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, start: _Optional[_Union[SessionStart, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[SessionStep, _Mapping]]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class SessionStart(_message.Message):
    __slots__ = ("graph", "graph_digest", "output", "wrt", "fetch", "response_payload", "max_message_bytes", "stop_on_error")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STOP_ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    graph_digest: str
    output: str
    wrt: _containers.RepeatedScalarFieldContainer[str]
    fetch: _containers.RepeatedScalarFieldContainer[str]
    response_payload: PayloadForm
    max_message_bytes: int
    stop_on_error: bool
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., graph_digest: _Optional[str] = ..., output: _Optional[str] = ..., wrt: _Optional[_Iterable[str]] = ..., fetch: _Optional[_Iterable[str]] = ..., response_payload: _Optional[_Union[PayloadForm, str]] = ..., max_message_bytes: _Optional[int] = ..., stop_on_error: _Optional[bool] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("kind", "inputs", "seed")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: StepKind
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    seed: _tensor_pb2.Tensor
    def __init__(self, kind: _Optional[_Union[StepKind, str]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., seed: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("target", "name", "index", "dtype", "shape", "data")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    target: ChunkTarget
    name: str
    index: int
    dtype: _tensor_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, target: _Optional[_Union[ChunkTarget, str]] = ..., name: _Optional[str] = ..., index: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("values", "gradients", "skipped", "error")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    values: _containers.MessageMap[str, _tensor_pb2.Tensor]
    gradients: _containers.MessageMap[str, _tensor_pb2.Tensor]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedNode]
    error: StepError
    def __init__(self, values: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., gradients: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., skipped: _Optional[_Iterable[_Union[SkippedNode, _Mapping]]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("results", "chunks", "graph_digest")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    graph_digest: str
    def __init__(self, results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., graph_digest: _Optional[str] = ...) -> None: ...
