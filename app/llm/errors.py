"""Errors of the model providers and the tools.

    LLMError                       the model could not give (all of) an answer
    ├── ProviderUnavailableError   connection refused, 5xx after retries       (503)
    ├── ProviderRateLimitedError   429 after retries, or a wait past the       (429)
    │                              first-token deadline
    ├── ProviderTimeoutError       no answer / first token / next chunk in     (503)
    │                              time, or the call's deadline passed
    ├── ProviderRequestError       4xx other than 429: bad key, unknown model  (400)
    ├── ProviderProtocolError      a chunk we cannot parse
    └── ProviderStreamError        the stream broke in mid-answer
    ToolError                      a tool call could not be carried out; given back to the model
    ├── UnknownToolError
    ├── ToolArgumentsError         arguments are not valid JSON or break the tool's schema/limits
    ├── ToolTimeoutError
    └── ToolExecutionError         the tool itself failed

``code`` is the snake_case name used in events and on the wire.
"""

from __future__ import annotations


class LLMError(Exception):
    code = "model_error"


class ProviderUnavailableError(LLMError):
    code = "model_unavailable"


class ProviderRateLimitedError(LLMError):
    code = "model_rate_limited"


class ProviderTimeoutError(LLMError):
    code = "model_timeout"


class ProviderRequestError(LLMError):
    code = "model_request_refused"


class ProviderProtocolError(LLMError):
    code = "model_protocol_error"


class ProviderStreamError(LLMError):
    code = "model_stream_broken"


class ToolError(Exception):
    code = "tool_error"


class UnknownToolError(ToolError):
    code = "unknown_tool"


class ToolArgumentsError(ToolError):
    code = "invalid_tool_arguments"


class ToolTimeoutError(ToolError):
    code = "tool_timeout"


class ToolExecutionError(ToolError):
    code = "tool_failed"
