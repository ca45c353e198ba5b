"""Regenerate the quickstart's sample dialogues: `python multimood/sample_data/write_dialogues.py`.

Writes `dialogues.jsonl` (training turns) and `heldout.jsonl` (turns of other dialogues, for the
quickstart's accuracy line) beside this file. Every sentence comes from the phrase tables below, which
we wrote for this purpose; nothing is taken from a corpus.

The data is made so that a tiny model trained for a minute can learn something visible:
- the client's emotion is carried by the client's words (a cue phrase of the emotion around an event
  of the dialogue's topic), neutral turns are the most frequent label but under a third of the turns;
- the strategy follows the client's emotion and the turn (the first turn of a session is structured,
  a client asking what to do gets advice), the therapist's emotion follows the strategy;
- each strategy has its own style of reply, filled in with the topic's words.
The generator is seeded: running it again writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIPS = ["clip_a.mp4", "clip_b.mp4", "clip_c.mp4", "clip_d.mp4", "clip_e.mp4"]  # quickstart.SAMPLE_CLIPS

# topic: problem type, situation, who, what the sessions are about, and one event per emotion
# (each event is a clause that reads after "because" and at the start of a sentence).
TOPICS = [
    {
        "problem_type": "job crisis", "situation": "My new manager criticises everything I do.",
        "who": "my manager", "about": "work",
        "events": {
            "anger": ["my manager shouted at me in front of the whole team",
                      "my manager blamed me for his own mistake"],
            "fear": ["I might lose my job next month", "the company is cutting half of the team"],
            "sadness": ["my closest colleague left the company", "nobody noticed how hard I worked this year"],
            "depression": ["I can't face going to the office any more", "I lie in bed all weekend after work"],
            "joy": ["I got the promotion I asked for", "my project was finally approved"],
            "disgust": ["my manager took credit for my work", "my manager lies to the clients"],
            "neutral": ["I had a meeting with my manager on Monday", "I work in the accounts department"],
        },
    },
    {
        "problem_type": "conflict with family", "situation": "My sister and I argue about caring for our parents.",
        "who": "my sister", "about": "your family",
        "events": {
            "anger": ["my sister told our parents I never help", "my sister cancelled on me again"],
            "fear": ["my father might have to go into a care home", "my mother could fall again when she is alone"],
            "sadness": ["my mother did not recognise me yesterday", "we used to be so close as children"],
            "depression": ["I don't see the point of calling them any more", "I feel like a failure as a daughter"],
            "joy": ["my sister and I finally had a good talk", "my parents came for dinner and it went well"],
            "disgust": ["my sister took money from our parents", "my brother-in-law laughed at my mother"],
            "neutral": ["I visit my parents every Sunday", "my sister lives in another town"],
        },
    },
    {
        "problem_type": "breakups or divorce", "situation": "My partner left me after six years.",
        "who": "my partner", "about": "the breakup",
        "events": {
            "anger": ["my partner moved in with someone else a week later",
                      "my partner kept the flat we bought together"],
            "fear": ["I will be alone for the rest of my life", "I won't be able to pay the rent alone"],
            "sadness": ["I found our old photos in a drawer", "our anniversary was on Saturday"],
            "depression": ["I stopped eating properly since the breakup", "I haven't left the house in days"],
            "joy": ["I went out with my friends and laughed again", "I finally redecorated the flat the way I like"],
            "disgust": ["my partner cheated on me for a year", "my partner told everyone lies about me"],
            "neutral": ["we signed the papers on Friday", "my partner picked up the last boxes"],
        },
    },
    {
        "problem_type": "academic pressure", "situation": "My final exams are in three weeks.",
        "who": "my tutor", "about": "your studies",
        "events": {
            "anger": ["my tutor failed my essay without reading it", "my group did none of the work"],
            "fear": ["I will fail the exams and disappoint everyone", "I freeze every time I sit down to revise"],
            "sadness": ["my best friend dropped out of the course", "I got the lowest mark in the class"],
            "depression": ["I stopped going to lectures weeks ago", "studying feels completely pointless now"],
            "joy": ["I passed the mock exam with a good mark", "my tutor praised my thesis"],
            "disgust": ["a classmate copied my work and got a better mark",
                        "my tutor mocks students who ask questions"],
            "neutral": ["I study in the library most days", "the exams start on the twelfth"],
        },
    },
    {
        "problem_type": "health problems", "situation": "I was diagnosed with diabetes last month.",
        "who": "my doctor", "about": "your health",
        "events": {
            "anger": ["my doctor kept me waiting for three hours", "my doctor dismissed my pain as stress"],
            "fear": ["the test results might show something worse", "I could end up in hospital again"],
            "sadness": ["I can't play football with my son any more", "I had to give up the food I love"],
            "depression": ["I stopped taking my medication", "nothing I do seems to make me better"],
            "joy": ["my blood tests came back much better", "I walked five kilometres without stopping"],
            "disgust": ["the clinic treated me like a number", "my colleague made jokes about my illness"],
            "neutral": ["I see my doctor every two weeks", "I changed my diet last month"],
        },
    },
    {
        "problem_type": "loneliness", "situation": "I moved to a new city and know nobody here.",
        "who": "my neighbour", "about": "the move",
        "events": {
            "anger": ["my neighbour complained about me to the landlord", "my old friends stopped answering my calls"],
            "fear": ["I will never make friends here", "something will happen to me and nobody will notice"],
            "sadness": ["I spent my birthday alone", "I miss my old friends every evening"],
            "depression": ["I stay in my room all weekend", "there is no reason to get up in the morning"],
            "joy": ["a colleague invited me to dinner", "I joined a choir and met lovely people"],
            "disgust": ["my flatmate leaves rotten food everywhere", "people here ignore anyone who is new"],
            "neutral": ["I moved here in March", "I take the bus to work every day"],
        },
    },
    {
        "problem_type": "grief", "situation": "My grandmother died two months ago.",
        "who": "my grandmother", "about": "your grandmother",
        "events": {
            "anger": ["my cousins fought over her house at the funeral", "the hospital never told us she was so ill"],
            "fear": ["I will forget the sound of her voice", "my grandfather will be next"],
            "sadness": ["I still pick up the phone to call her", "her garden is empty now"],
            "depression": ["I haven't felt anything since the funeral", "life feels grey without her"],
            "joy": ["I cooked her recipe and it tasted just like hers", "my family laughed about her old stories"],
            "disgust": ["my uncle sold her things the day after", "people at the funeral only talked about money"],
            "neutral": ["the funeral was in her village", "I sorted her letters last weekend"],
        },
    },
    {
        "problem_type": "problems with friends", "situation": "My best friend stopped talking to me.",
        "who": "my best friend", "about": "your friendship",
        "events": {
            "anger": ["my best friend told my secret to everyone", "my best friend ignored me at the party"],
            "fear": ["I will lose all my friends", "my best friend hates me now"],
            "sadness": ["we used to talk every day", "my best friend didn't come to my birthday"],
            "depression": ["I don't care about seeing anyone any more", "I feel invisible to everyone"],
            "joy": ["my best friend called me and apologised", "we went hiking together again"],
            "disgust": ["my best friend spread rumours about me", "my friends laughed at someone who was crying"],
            "neutral": ["we met at school", "I saw my best friend at the shop"],
        },
    },
]

# How the client says an event with each emotion ({e}: the event clause).
CLIENT_CUES = {
    "anger": ["I'm so angry. {E}.", "It makes me furious: {e}.", "{E}, and I'm still mad about it.",
              "I could scream. {E}."],
    "fear": ["I'm scared that {e}.", "I keep worrying that {e}.", "I'm terrified. What if {e}?", "I'm afraid {e}."],
    "sadness": ["{E}. I feel so sad.", "I cried all night because {e}.", "It breaks my heart that {e}.",
                "{E}, and I miss how it was."],
    "depression": ["I feel empty. {E}.", "Nothing matters anymore. {E}.", "{E}. I'm so tired of everything.",
                   "I feel hopeless, {e}."],
    "joy": ["Good news! {E}.", "I'm really happy: {e}.", "{E}, and I feel great!", "Guess what? {E}!"],
    "disgust": ["It's disgusting. {E}.", "I'm sick of it: {e}.", "{E}. It makes me feel sick.",
                "How gross is that? {E}."],
    "neutral": ["{E}.", "Well, {e}.", "So, {e}.", "{E}, that's all."],
}
ASKING = ["What should I do?", "How do I deal with this?"]
FIRST_WORDS = ["Hello. I'm not sure where to start.", "Hi. This is my first time here.",
               "Good morning. Where do I begin?"]

# The therapist's strategies after each client emotion, as (strategy, weight).
STRATEGIES = {
    "anger": [("restatement", 3), ("interpretation", 2)],
    "fear": [("open question", 3), ("communication skills", 2)],
    "sadness": [("self-disclosure", 2), ("communication skills", 2), ("interpretation", 1)],
    "depression": [("guiding the pace and depth of the conversation", 3), ("open question", 1)],
    "joy": [("approval", 4)],
    "disgust": [("interpretation", 2), ("restatement", 2)],
    "neutral": [("open question", 3), ("others", 1)],
}
# How the client's emotion reads inside the therapist's sentence.
FEELING = {
    "anger": "angry", "fear": "frightened", "sadness": "sad", "depression": "low", "joy": "happy",
    "disgust": "disgusted", "neutral": "calm",
}
# Replies per strategy ({who}, {about}, {feel}, {e}: the client's event, in the therapist's words).
REPLIES = {
    "open question": ["What goes through your mind when you think about {about}?", "How did you feel when {e}?",
                      "What is the hardest part of {about} for you?"],
    "approval": ["That's wonderful, I'm really glad {e}.", "Well done! You worked hard for this.",
                 "That is great news, you should be proud."],
    "self-disclosure": ["I remember feeling like that when I lost someone close.",
                        "I have been through something similar, and it hurt me too."],
    "restatement": ["So you feel {feel} because {e}.", "You are {feel} that {e}."],
    "interpretation": ["It sounds like {e}, and that left you feeling {feel}.",
                       "Maybe part of you feels let down by {who}."],
    "advisement": ["Maybe you could talk to {who} about how you feel.",
                   "It might help to write down what you want to say to {who}."],
    "communication skills": ["I hear you. Take your time, I'm listening.",
                             "That sounds really hard. I'm here with you."],
    "structuring the therapy": ["Let's use today's session to talk about {about}.",
                                "We have fifty minutes today. Let's start with {about}."],
    "guiding the pace and depth of the conversation": ["Let's slow down and stay with that feeling for a moment.",
                                                        "We don't have to go into it all today. Tell me what you can."],
    "others": ["Mm-hm.", "I see. Go on."],
}
THERAPIST_EMOTION = {"approval": "joy", "self-disclosure": "sadness"}

# Client emotions of a turn (weights): neutral is the largest label, under a third of the turns.
EMOTION_WEIGHTS = {"neutral": 5, "anger": 3, "fear": 3, "sadness": 3, "depression": 3, "joy": 3, "disgust": 2}


def _therapist_words(event: str) -> str:
    """The client's event as the therapist says it back (first person -> second person)."""
    swaps = {"I": "you", "I'm": "you're", "I've": "you've", "I'll": "you'll", "me": "you", "my": "your",
             "myself": "yourself", "am": "are", "was": "were", "we": "you", "our": "your", "us": "you"}
    words = [swaps.get(word, word) for word in event.split()]
    return " ".join(words)


def _weighted(rng: random.Random, pairs):
    items, weights = zip(*pairs)
    return rng.choices(items, weights=weights, k=1)[0]


def _turn(rng: random.Random, topic: dict, emotion: str, first: bool) -> tuple[list[str], str, str, str]:
    """One exchange: (client fragments, strategy, therapist emotion, reply)."""
    event = rng.choice(topic["events"][emotion])
    cue = rng.choice(CLIENT_CUES[emotion])
    client = [cue.format(e=event, E=event[0].upper() + event[1:])]
    if first:
        client.insert(0, rng.choice(FIRST_WORDS))
    if first and emotion == "neutral":
        strategy = "structuring the therapy"
    elif emotion != "joy" and rng.random() < 0.2:
        client.append(rng.choice(ASKING))
        strategy = "advisement"
    else:
        strategy = _weighted(rng, STRATEGIES[emotion].copy())
    reply = rng.choice(REPLIES[strategy]).format(
        who=_therapist_words(topic["who"]), about=topic["about"], feel=FEELING[emotion], e=_therapist_words(event),
    )
    return client, strategy, THERAPIST_EMOTION.get(strategy, "neutral"), reply


def dialogue(rng: random.Random, dialogue_id: int, topic: dict, turns: int, string_history: bool) -> list[dict]:
    """One session: `turns` records, each with the last two exchanges as its history and one or two clips."""
    emotions = list(EMOTION_WEIGHTS)
    weights = list(EMOTION_WEIGHTS.values())
    records, history = [], []
    for index in range(turns):
        emotion = rng.choices(emotions, weights=weights, k=1)[0]
        client, strategy, therapist_emotion, reply = _turn(rng, topic, emotion, first=index == 0)
        if string_history:  # the seed README's form: "Client: ..." / "Therapist: ..." strings
            history_chat = [f"{'Client' if m['role'] == 'user' else 'Therapist'}: {m['content']}" for m in history[-4:]]
        else:
            history_chat = [dict(m) for m in history[-4:]]
        records.append({
            "Dialogue_ID": dialogue_id,
            "Utterance": [reply],
            "Emotion": therapist_emotion,
            "Strategy": strategy,
            "get_emotion_user_most_recent": emotion,
            "path_to_vid_user_most_recent": rng.sample(CLIPS, rng.choice([1, 2])),
            "utt_user_most_recent": client,
            "history_chat": history_chat,
            "situation": topic["situation"],
            "problem_type": topic["problem_type"],
        })
        history += [{"role": "user", "content": " ".join(client)}, {"role": "assistant", "content": reply}]
    return records


def write(train_dialogues: int = 40, heldout_dialogues: int = 8, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out records; held-out client words never occur verbatim in training."""
    rng = random.Random(seed)
    train = []
    for dialogue_id in range(1, train_dialogues + 1):
        topic = TOPICS[(dialogue_id - 1) % len(TOPICS)]
        train += dialogue(rng, dialogue_id, topic, rng.randint(3, 5), string_history=dialogue_id % 5 == 0)
    seen = {" ".join(r["utt_user_most_recent"]) for r in train}
    heldout = []
    dialogue_id = train_dialogues
    while len({r["Dialogue_ID"] for r in heldout}) < heldout_dialogues:
        dialogue_id += 1
        topic = TOPICS[(dialogue_id - 1) % len(TOPICS)]
        records = dialogue(rng, dialogue_id, topic, 4, string_history=False)
        if not any(" ".join(r["utt_user_most_recent"]) in seen for r in records):
            heldout += records
    for name, records in (("dialogues.jsonl", train), ("heldout.jsonl", heldout)):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return train, heldout


if __name__ == "__main__":
    train_records, heldout_records = write()
    print(f"{len(train_records)} training turns, {len(heldout_records)} held-out turns")
