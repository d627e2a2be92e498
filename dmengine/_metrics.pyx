# cython: language_level=3
"""The device port's per-message counters, compiled (L3): the base of
``dmengine.metrics.DeviceMetrics``.

The device port counts five things per DM message (message in, message out, session start
and end, request latency).  As Python methods bumping dicts they cost 1.1–1.8 µs per message,
5–9 % of a ~20 µs message.  Here they are fixed fields and arrays (the encoding is ``xml`` or
``wbxml``, the histograms' buckets are C arrays), and the compiled device port reaches them
as ``cdef`` methods through ``_metrics.pxd``: a C call each, no method look-up, no boxed
argument.  The Python methods of the same meaning wrap them for everything else.  Only the
session end's reason stays a dict (reasons are a small open set).
``DeviceMetrics`` (dmengine/metrics.py) reads the fields when the registry is scraped.
"""
#: request latency buckets, seconds (metrics.LATENCY_BUCKETS, the same numbers)
LATENCY_BOUNDS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)
#: whole-session buckets, seconds (metrics.SESSION_BUCKETS)
SESSION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

# (NLAT, NSES and monotonic() come from _metrics.pxd)


cdef inline int _enc(str encoding) noexcept:
    return 1 if encoding == "wbxml" else 0


cdef inline int _bucket(const double* bounds, int n, double v) noexcept nogil:
    """Index of the first bound >= v (Prometheus ``le``); n for +Inf."""
    cdef int i = 0
    while i < n and v > bounds[i]:
        i += 1
    return i


cdef class DeviceCounters:
    """Plain C counters of the device port (see the module docstring; fields in _metrics.pxd)."""

    def __cinit__(self, *args, **kw):
        cdef int i
        assert len(LATENCY_BOUNDS) == NLAT and len(SESSION_BOUNDS) == NSES
        for i in range(NLAT):
            self._lat_bounds[i] = LATENCY_BOUNDS[i]
        for i in range(NSES):
            self._ses_bounds[i] = SESSION_BOUNDS[i]
        self._ended = {}

    # --- the hot path: C calls from _dmcore.pyx and _devport.pyx (cimport, _metrics.pxd) ------

    cdef void count_in(self, str encoding, Py_ssize_t nbytes) noexcept:
        cdef int e = _enc(encoding)
        self._msg_in[e] += 1
        self._bytes_in[e] += nbytes

    cdef void count_out(self, str encoding, Py_ssize_t nbytes) noexcept:
        cdef int e = _enc(encoding)
        self._msg_out[e] += 1
        self._bytes_out[e] += nbytes

    cdef double begin_session(self) noexcept:
        self.started += 1
        self.in_flight += 1
        return monotonic()

    cdef int end_session(self, str reason, double started) except -1:
        cdef double d
        if reason is not self._reason:     # the same text from the same literal: the same str
            self._fold_reason()
            self._reason = reason
        self._reason_n += 1
        self.in_flight -= 1
        if started > 0.0:
            d = monotonic() - started
            if d < 0.0:
                d = 0.0
            self._ses[_bucket(self._ses_bounds, NSES, d)] += 1
            self.session_sum += d
        return 0

    cdef void time_request(self, double seconds) noexcept:
        self._lat[_bucket(self._lat_bounds, NLAT, seconds)] += 1
        self.latency_sum += seconds

    cdef int _fold_reason(self) except -1:
        """Adds the run of ends counted in C to the dict."""
        if self._reason_n:
            n = self._ended.get(self._reason)
            self._ended[self._reason] = self._reason_n if n is None else n + self._reason_n
            self._reason_n = 0
        return 0

    # --- the same from Python (server.py's rarer paths, tests, other callers) -----------------

    def message_in(self, str encoding, Py_ssize_t nbytes):
        self.count_in(encoding, nbytes)

    def message_out(self, str encoding, Py_ssize_t nbytes):
        self.count_out(encoding, nbytes)

    def session_started(self):
        """Counts a new session; returns its start (monotonic), which the session table keeps
        for :meth:`session_ended`."""
        return self.begin_session()

    def session_ended(self, str reason, double started=0.0):
        """``started``: what :meth:`session_started` returned (0: unknown, not timed)."""
        self.end_session(reason, started)

    def observe_latency(self, double seconds):
        self.time_request(seconds)

    def connection_opened(self):
        self.connections += 1

    def connection_closed(self):
        self.connections -= 1

    # --- read at scrape time -----------------------------------------------------------------

    @property
    def ended(self):
        """{reason: sessions ended} (the dict itself: read it, do not keep it across ends)."""
        self._fold_reason()
        return self._ended

    def counts(self):
        """{"msg_in"|"msg_out"|"bytes_in"|"bytes_out": {encoding: n}}."""
        return {"msg_in": {"xml": self._msg_in[0], "wbxml": self._msg_in[1]},
                "msg_out": {"xml": self._msg_out[0], "wbxml": self._msg_out[1]},
                "bytes_in": {"xml": self._bytes_in[0], "wbxml": self._bytes_in[1]},
                "bytes_out": {"xml": self._bytes_out[0], "wbxml": self._bytes_out[1]}}

    @property
    def buckets(self):
        """Request-latency bucket counts (not cumulative; the last is +Inf)."""
        return [self._lat[i] for i in range(NLAT + 1)]

    @property
    def session_buckets(self):
        return [self._ses[i] for i in range(NSES + 1)]
