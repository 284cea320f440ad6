import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_ATTESTATION: _ClassVar[Role]
    ROLE_AGGREGATOR: _ClassVar[Role]
    ROLE_TRAINER: _ClassVar[Role]
    ROLE_OPERATOR: _ClassVar[Role]
    ROLE_RELAY: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_ATTESTATION: Role
ROLE_AGGREGATOR: Role
ROLE_TRAINER: Role
ROLE_OPERATOR: Role
ROLE_RELAY: Role

class Evidence(_message.Message):
    __slots__ = ("sgx_quote", "ra_tls_certificate")
    SGX_QUOTE_FIELD_NUMBER: _ClassVar[int]
    RA_TLS_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    sgx_quote: bytes
    ra_tls_certificate: bytes
    def __init__(self, sgx_quote: _Optional[bytes] = ..., ra_tls_certificate: _Optional[bytes] = ...) -> None: ...

class Measurements(_message.Message):
    __slots__ = ("mrenclave", "mrsigner", "isv_prod_id", "isv_svn", "debug", "report_data", "tee_type")
    MRENCLAVE_FIELD_NUMBER: _ClassVar[int]
    MRSIGNER_FIELD_NUMBER: _ClassVar[int]
    ISV_PROD_ID_FIELD_NUMBER: _ClassVar[int]
    ISV_SVN_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    REPORT_DATA_FIELD_NUMBER: _ClassVar[int]
    TEE_TYPE_FIELD_NUMBER: _ClassVar[int]
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    report_data: bytes
    tee_type: str
    def __init__(self, mrenclave: _Optional[bytes] = ..., mrsigner: _Optional[bytes] = ..., isv_prod_id: _Optional[int] = ..., isv_svn: _Optional[int] = ..., debug: _Optional[bool] = ..., report_data: _Optional[bytes] = ..., tee_type: _Optional[str] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("accepted", "reason_code", "reason", "tcb_status", "advisory_ids", "measurements", "role", "simulated")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TCB_STATUS_FIELD_NUMBER: _ClassVar[int]
    ADVISORY_IDS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason_code: str
    reason: str
    tcb_status: str
    advisory_ids: _containers.RepeatedScalarFieldContainer[str]
    measurements: Measurements
    role: Role
    simulated: bool
    def __init__(self, accepted: _Optional[bool] = ..., reason_code: _Optional[str] = ..., reason: _Optional[str] = ..., tcb_status: _Optional[str] = ..., advisory_ids: _Optional[_Iterable[str]] = ..., measurements: _Optional[_Union[Measurements, _Mapping]] = ..., role: _Optional[_Union[Role, str]] = ..., simulated: _Optional[bool] = ...) -> None: ...

class IssueCertificateRequest(_message.Message):
    __slots__ = ("csr", "evidence", "role", "label")
    CSR_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    evidence: Evidence
    role: Role
    label: str
    def __init__(self, csr: _Optional[bytes] = ..., evidence: _Optional[_Union[Evidence, _Mapping]] = ..., role: _Optional[_Union[Role, str]] = ..., label: _Optional[str] = ...) -> None: ...

class IssueCertificateResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_certificates_pem", "not_after", "verdict")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATES_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    ca_certificates_pem: str
    not_after: _timestamp_pb2.Timestamp
    verdict: Verdict
    def __init__(self, certificate_pem: _Optional[str] = ..., ca_certificates_pem: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class VerifyEvidenceRequest(_message.Message):
    __slots__ = ("evidence", "role", "at")
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    evidence: Evidence
    role: Role
    at: _timestamp_pb2.Timestamp
    def __init__(self, evidence: _Optional[_Union[Evidence, _Mapping]] = ..., role: _Optional[_Union[Role, str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class VerifyEvidenceResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class GetTrustBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrustBundleResponse(_message.Message):
    __slots__ = ("ca_certificates_pem", "attestation_certificate_pem", "policy_sha256")
    CA_CERTIFICATES_PEM_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    POLICY_SHA256_FIELD_NUMBER: _ClassVar[int]
    ca_certificates_pem: str
    attestation_certificate_pem: str
    policy_sha256: str
    def __init__(self, ca_certificates_pem: _Optional[str] = ..., attestation_certificate_pem: _Optional[str] = ..., policy_sha256: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy_toml", "policy_sha256")
    POLICY_TOML_FIELD_NUMBER: _ClassVar[int]
    POLICY_SHA256_FIELD_NUMBER: _ClassVar[int]
    policy_toml: str
    policy_sha256: str
    def __init__(self, policy_toml: _Optional[str] = ..., policy_sha256: _Optional[str] = ...) -> None: ...
