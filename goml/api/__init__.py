"""The API shared by every part of goml: plain request/response values, error codes,
the client retry policy and the task-argument schemas.

Both the control plane (`goml.cluster`) and the agent (`goml.agent`) import this
package, and it imports neither, so no import runs back up a layer. Everything here is
sans-IO except `wire` (protobuf conversion) and `task_args` (entry-point discovery).
"""
