# Decimal CmdIDs for Message.number_commands, shared by the WBXML and XML encoders (L0/L1):
# inline functions compiled into each encoder, no module of their own.

cdef inline long decimal_value(str s):
    """The value of a short decimal text (up to 9 digits), -1 when it is not one."""
    cdef long v = 0
    cdef Py_ssize_t i, n = len(s)
    if n == 0 or n > 9:
        return -1
    for i in range(n):
        if not (u'0' <= s[i] <= u'9'):
            return -1
        v = v * 10 + (<long>s[i] - 48)
    return v


cdef inline int decimal_digits(long v, char* out):
    """Writes ``v`` (>= 0) in decimal into ``out`` (20 bytes at least); returns the length."""
    cdef char tmp[20]
    cdef int n = 0, i
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


cdef inline int next_cmd_id(long* next_id, str given, char* out):
    """Message.number_commands bookkeeping for one command.  With a ``given`` CmdID the
    numbering goes on after it and 0 is returned (the encoder writes ``given``); without one,
    the next number goes into ``out`` (20 bytes at least) and its length is returned."""
    cdef long v
    if given is not None:
        v = decimal_value(given)
        next_id[0] = v + 1 if v >= 0 else next_id[0] + 1
        return 0
    v = next_id[0]
    next_id[0] = v + 1
    return decimal_digits(v, out)
