# Declarations of dmengine/simulator/_client.pyx, for typed access from _lane.pyx.

cdef class Outgoing:
    cdef public object body, content_type, headers, url, wire_headers


cdef class Template:
    cdef public tuple parts
    cdef public bint with_cred
    cdef public dict alerts


cdef class ClientBase:
    cdef public object device, profile, rng, session_id, alert, url, encoding, content_type
    cdef public object _decode, _encode, server_msg_id, auth_scheme, hdr_status, outcome
    cdef public object detail, in_chunk, server_authenticated, last_sent
    cdef public list outbox, jobs, out_chunks, sent_alerts, results
    cdef public set _continuations
    cdef public Py_ssize_t msg_id, server_max_msg, server_max_obj, auth_attempts
    cdef public Py_ssize_t messages_sent, messages_received
    cdef public bint authenticated, done, want_final, package1_pending, server_final
