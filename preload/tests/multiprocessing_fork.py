# Python multiprocessing with the fork start method over a large bytearray: under mosrun it
# must print what it prints without (mosrun/tests/mosrun.rs).
import multiprocessing as mp, os, resource, sys
big = bytearray(int(os.environ.get('FORK_TEST_MIB', '48')) << 20)
for i in range(0, len(big), 4096):
    big[i] = i % 251
def work(k):
    # Reads memory inherited from the parent, writes a byte of it privately.
    s = sum(big[k * 4096::4096 * 7])
    big[k * 4096] = 1          # private to this worker
    return s + big[k * 4096]
if __name__ == '__main__':
    mp.set_start_method('fork')
    with mp.Pool(3) as pool:
        print(pool.map(work, range(12)))
    print(sum(big[::4096]))
    print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
