/* The echo service that thriftpool's tests, examples and benchmarks use. */

exception EchoError {
    1: string message
}

service Echo {
    /* Returns its argument unchanged. */
    string echo(1: string message),

    /* Does nothing: a cheap heartbeat. */
    void ping(),

    /* Sleeps for `ms` milliseconds, then returns `ms`. */
    i32 sleep(1: i32 ms),

    /* Names the server instance that answered ("host:port" unless configured). */
    string whoami(),

    /* Always raises the IDL-declared EchoError carrying `message`. */
    string fail(1: string message) throws (1: EchoError error),

    /* One way: the server records `message` (a test server counts it); no reply. */
    oneway void notify(1: string message),
}
