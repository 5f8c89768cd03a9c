/*
 * What a TLB flush per dropped run costs while the process runs on another CPU, against one
 * process_madvise(MADV_DONTNEED) for all the runs (the pager's RegionCore::drop_runs):
 * drops 64 scattered pages 200 times each way, with a second thread spinning on the other CPU
 * (as a program's threads, the evictor or a fault worker do), and prints the mean per batch.
 *   cc -O2 -pthread -o drop_batch benches/scripts/drop_batch.c && ./drop_batch
 * Needs Linux 6.13 or later for process_madvise(MADV_DONTNEED) on the process itself.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <time.h>
#include <pthread.h>
static volatile int stop;
static void *spin(void *a){ while(!stop); return 0; }
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec*1e6+t.tv_nsec/1e3;}
int main(){
  int pidfd = syscall(SYS_pidfd_open, getpid(), 0);
  size_t n = 4096*1024; char *p = mmap(0, n, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
  pthread_t t; pthread_create(&t, 0, spin, 0); /* keep the mm live on the other CPU */
  struct iovec iov[64];
  for (int mode=0; mode<2; mode++){
    double tot=0; int rounds=200;
    for(int r=0;r<rounds;r++){
      for (size_t i=0;i<n;i+=4096) p[i]=1;
      double t0=now();
      if(mode==0){ for(int k=0;k<64;k++){ madvise(p+(size_t)k*2*4096*8, 4096, MADV_DONTNEED);} }
      else { for(int k=0;k<64;k++){ iov[k].iov_base=p+(size_t)k*2*4096*8; iov[k].iov_len=4096;}
             long rc = syscall(SYS_process_madvise, pidfd, iov, 64, MADV_DONTNEED, 0); if(rc<0){perror("process_madvise"); return 1;} }
      tot+=now()-t0;
    }
    printf("%s: %.2f us per 64 scattered pages\n", mode?"process_madvise":"one madvise per page", tot/rounds);
  }
  stop=1; pthread_join(t,0); return 0; }
