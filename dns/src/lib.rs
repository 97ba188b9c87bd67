//! netd's embedded DNS server library (service discovery at 127.0.0.11 in every task).
//! Empty in this build: service names do not resolve yet.
