/* The clock the cores actually run at, for the peak-FLOP/s derivation in the README (not a test).
 * A chain of dependent integer additions retires one per cycle, so additions per second = Hz.
 * Run one copy per core at once to see the all-core clock:
 *     gcc -O2 benchmarks/clock.c -o /tmp/clock && (for i in $(seq $(nproc)); do /tmp/clock & done; wait)
 */
#include <stdio.h>
#include <time.h>

int main(void) {
    const unsigned long rounds = 4000000000UL;
    unsigned long x = 0;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (unsigned long i = 0; i < rounds; i++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    clock_gettime(CLOCK_MONOTONIC, &end);
    double seconds = (double)(end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    printf("%.2f GHz (%lu dependent additions in %.2f s)\n", 4.0 * rounds / seconds / 1e9, x, seconds);
    return 0;
}
